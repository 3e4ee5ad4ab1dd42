"""Upload the Space folder (`spaces/hf-ddpm/`: app, front matter, requirements, bundled model) as a Gradio Space.

    python -m hf_ddpm.space_deploy --repo_id <user-or-org>/hf-ddpm

Needs a token with write access (`hf auth login` or HF_TOKEN). Run from the repository root, or pass --folder.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

DEFAULT_FOLDER = "spaces/hf-ddpm"
# upload_folder does not read .gitignore: leave out caches, Gradio's run files and training leftovers.
IGNORE_PATTERNS = (
    "*__pycache__*",
    "*.pyc",
    "*.DS_Store",
    ".gradio/*",
    "flagged/*",
    "*.ipynb_checkpoints*",
    "model/checkpoint-*",
    "model/logs/*",
    "model/samples/*",
)
REQUIRED_FILES = ("app.py", "README.md", "requirements.txt")


def check_space_folder(folder: str | Path) -> None:
    """Raise a ValueError unless `folder` looks deployable: app, README with a gradio front matter, requirements
    without gradio (a Space takes Gradio's version from `sdk_version`)."""
    from huggingface_hub import SpaceCard
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    folder = Path(folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} is not a Space folder: missing {', '.join(missing)}.")
    data = SpaceCard.load(folder / "README.md").data
    if data.get("sdk") != "gradio" or not data.get("sdk_version") or data.get("app_file") != "app.py":
        raise ValueError(
            f"{folder / 'README.md'}: the front matter needs sdk: gradio, sdk_version and app_file: app.py."
        )
    for line in (folder / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):  # options such as --extra-index-url
            continue
        try:
            name = canonicalize_name(Requirement(line).name)
        except InvalidRequirement as err:
            raise ValueError(f"{folder / 'requirements.txt'}: {err}") from err
        if name == "gradio":
            raise ValueError(f"{folder / 'requirements.txt'} lists {line!r}; Spaces install Gradio from sdk_version.")


def deploy_space(
    repo_id: str,
    folder: str | Path = DEFAULT_FOLDER,
    private: bool = False,
    token: str | None = None,
    commit_message: str = "Deploy the hf-ddpm Space",
) -> str:
    """Create the Space `repo_id` (gradio SDK) if needed and upload `folder` to it in one commit; returns its URL."""
    from huggingface_hub import HfApi

    check_space_folder(folder)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        repo_type="space",
        ignore_patterns=list(IGNORE_PATTERNS),
        commit_message=commit_message,
    )
    return str(url)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: `python -m hf_ddpm.space_deploy --repo_id org/hf-ddpm [--folder ...] [--private]`."""
    parser = argparse.ArgumentParser(prog="python -m hf_ddpm.space_deploy", description=__doc__.splitlines()[0])
    parser.add_argument("--repo_id", required=True, help="The Space to create or update, e.g. my-org/hf-ddpm.")
    parser.add_argument("--folder", default=DEFAULT_FOLDER, help=f"The Space folder (default: {DEFAULT_FOLDER}).")
    parser.add_argument("--private", action="store_true", help="Create the Space as private.")
    parser.add_argument("--token", default=None, help="Hub token (default: the stored login or HF_TOKEN).")
    args = parser.parse_args(argv)
    try:
        url = deploy_space(args.repo_id, args.folder, private=args.private, token=args.token)
    except ValueError as err:
        parser.error(str(err))
    print(f"Deployed {args.folder} to {url}")


if __name__ == "__main__":
    main()
