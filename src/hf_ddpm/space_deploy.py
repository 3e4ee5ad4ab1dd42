"""Deploy the Space folder (`spaces/hf-ddpm/`: app, front matter, bundled model) as a Gradio Space that builds.

    python -m hf_ddpm.space_deploy --repo_id <user-or-org>/hf-ddpm

hf-ddpm is on no package index, so the upload carries the package itself: the deploy assembles the Space in a
temporary folder (the Space folder without caches or training leftovers, plus a copy of the `hf_ddpm` package beside
app.py, which `python app.py` finds first on sys.path) and writes its requirements.txt from the package's own
declared dependencies (pyproject's `dependencies` and the `space` extra, without Gradio, whose version a Space takes
from `sdk_version`). The folder is checked before anything is uploaded, then uploaded in one commit. A vendored
package rather than a wheel in requirements.txt: a Gradio Space runs `pip install -r requirements.txt` with that file
alone in the build context, so a path to a file of the repo does not resolve there.

Needs a token with write access (`hf auth login` or HF_TOKEN). Run from the repository root, or pass --folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

DEFAULT_FOLDER = "spaces/hf-ddpm"
PACKAGE = "hf_ddpm"  # the import name, and the vendored folder's name in the upload
DISTRIBUTION = "hf-ddpm"
SPACE_EXTRA = "space"
# Neither goes into the Space's requirements.txt: Gradio comes from sdk_version, hf-ddpm is vendored.
NOT_REQUIRED = ("gradio", DISTRIBUTION)
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
REQUIRED_FILES = ("app.py", "README.md", "requirements.txt", f"{PACKAGE}/__init__.py")
# pip reads requirements.txt alone on a Space (the rest of the repo is not there yet): options naming other files fail.
FILE_OPTIONS = ("-r", "--requirement", "-c", "--constraint", "-e", "--editable")
REQUIREMENTS_NOTE = (
    f"# {PACKAGE} is vendored beside app.py; its dependencies and `{SPACE_EXTRA}` extra, as the package declares them:"
)


def package_requirements(package_dir: str | Path | None = None) -> list[str]:
    """The requirement lines a Space needs for the `hf_ddpm` package in `package_dir` (default: the imported one).

    They are what the package declares (its dependencies and the `space` extra), without Gradio and hf-ddpm itself:
    read from pyproject.toml when `package_dir` is a source checkout's `src/hf_ddpm` (its installed metadata dates
    from the last `pip install -e`), else from the installed distribution's metadata.
    """
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    package_dir = Path(package_dir or Path(__file__).parent).resolve()
    pyproject = package_dir.parent.parent / "pyproject.toml"
    if package_dir.parent.name == "src" and pyproject.is_file() and sys.version_info >= (3, 11):
        import tomllib  # Python 3.11+; on 3.10 a checkout falls back to its installed metadata

        project = tomllib.loads(pyproject.read_text())["project"]
        if canonicalize_name(project.get("name", "")) != DISTRIBUTION:
            raise ValueError(f"{pyproject} is not {DISTRIBUTION}'s (name {project.get('name')!r}).")
        lines = [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get(SPACE_EXTRA, [])]
        declared = [Requirement(line) for line in lines]
    else:
        try:
            lines = metadata.requires(DISTRIBUTION) or []
        except metadata.PackageNotFoundError as err:
            raise ValueError(
                f"cannot tell what {package_dir} needs: it is not in a source checkout and {DISTRIBUTION} is not "
                "installed (pip install hf-ddpm, or run from the repository)."
            ) from err
        declared = []
        for requirement in map(Requirement, lines):
            if requirement.marker is not None and "extra" in str(requirement.marker):
                if not requirement.marker.evaluate({"extra": SPACE_EXTRA}):
                    continue
                requirement.marker = None  # `extra == "space"` means nothing in a requirements file
            declared.append(requirement)
    return [str(r) for r in declared if canonicalize_name(r.name) not in NOT_REQUIRED]


def assemble_space(folder: str | Path, destination: str | Path) -> Path:
    """Write the upload for the Space folder `folder` into the new folder `destination` and return it: `folder`'s
    files less IGNORE_PATTERNS, the imported `hf_ddpm` package copied to `hf_ddpm/`, and requirements.txt as
    `folder`'s own lines followed by `package_requirements()`. Raises ValueError naming what cannot be assembled.
    """
    from huggingface_hub.utils import filter_repo_objects

    import hf_ddpm

    folder, destination = Path(folder), Path(destination)
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is not a folder: pass --folder, the Space folder to deploy (e.g. {DEFAULT_FOLDER})."
        )
    if (folder / PACKAGE).exists():
        raise ValueError(f"{folder / PACKAGE} exists: the deploy vendors the installed {PACKAGE} there; remove it.")
    package_dir = Path(hf_ddpm.__file__).resolve().parent
    if not (package_dir / "__init__.py").is_file() or not (package_dir / "_version.py").is_file():
        raise ValueError(f"cannot vendor {PACKAGE} from {package_dir}: it is not a plain package folder.")
    requirements = package_requirements(package_dir)
    destination.mkdir(parents=True)
    for source, target in ((folder, destination), (package_dir, destination / PACKAGE)):
        names = sorted(p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file())
        for name in filter_repo_objects(names, ignore_patterns=list(IGNORE_PATTERNS)):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)
    own = (folder / "requirements.txt").read_text() if (folder / "requirements.txt").is_file() else ""
    own = own if not own or own.endswith("\n") else own + "\n"
    (destination / "requirements.txt").write_text(
        own + REQUIREMENTS_NOTE + "\n" + "".join(f"{r}\n" for r in requirements)
    )
    return destination


def check_space_folder(folder: str | Path, shown_as: str | Path | None = None) -> None:
    """Raise a ValueError, in one line naming the problem, unless `folder` is an upload a Space can build: app.py,
    a README whose front matter says gradio / sdk_version / app.py, the vendored `hf_ddpm/`, and a requirements.txt
    that pip can install on its own and that names neither Gradio (it comes from `sdk_version`) nor hf-ddpm (on no
    index: the package is vendored). Messages call the folder `shown_as` (default: `folder`), e.g. the Space folder
    an upload was assembled from."""
    from huggingface_hub import SpaceCard
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name

    folder = Path(folder)
    shown = Path(shown_as or folder)
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{shown} is not a Space upload: missing {', '.join(missing)}.")
    data = SpaceCard.load(folder / "README.md").data
    if data.get("sdk") != "gradio" or not data.get("sdk_version") or data.get("app_file") != "app.py":
        raise ValueError(
            f"{shown / 'README.md'}: the front matter needs sdk: gradio, sdk_version and app_file: app.py."
        )
    path = shown / "requirements.txt"
    for line in (folder / "requirements.txt").read_text().splitlines():
        line = line.strip()
        line = "" if line.startswith("#") else line.split(" #")[0].strip()
        if line.split(" ")[0].split("=")[0] in FILE_OPTIONS:
            raise ValueError(f"{path}: {line!r} names a file, but a Space installs requirements.txt on its own.")
        if not line or line.startswith("-"):  # options such as --extra-index-url
            continue
        try:
            requirement = Requirement(line)
        except InvalidRequirement as err:
            reason = str(err).splitlines()[0]  # packaging adds the line and a caret below
            raise ValueError(f"{path}: {line!r} is not a requirement pip can install from an index: {reason}") from err
        name = canonicalize_name(requirement.name)
        if name == "gradio":
            raise ValueError(f"{path} lists {line!r}; Spaces install Gradio from sdk_version.")
        if name == DISTRIBUTION:
            raise ValueError(f"{path} lists {line!r}, which is on no package index; the deploy vendors {PACKAGE}.")
        if requirement.url and requirement.url.startswith("file:"):
            raise ValueError(f"{path}: {line!r} is a local file, which a Space cannot install.")


def deploy_space(
    repo_id: str,
    folder: str | Path = DEFAULT_FOLDER,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Assemble the upload for `folder` (see `assemble_space`), check it, then create the Space `repo_id` (gradio
    SDK) if needed and upload it in one commit; returns the Space's URL. Nothing is created or uploaded unless the
    check passes."""
    from huggingface_hub import HfApi

    from ._version import __version__

    with tempfile.TemporaryDirectory(prefix="hf-ddpm-space-") as tmp:
        upload = assemble_space(folder, Path(tmp) / "space")
        check_space_folder(upload, shown_as=folder)
        api = HfApi(token=token)
        url = api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(upload),
            repo_id=repo_id,
            repo_type="space",
            commit_message=commit_message or f"Deploy the hf-ddpm Space (hf_ddpm {__version__}, vendored)",
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
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"Deployed {args.folder} to {url}")


if __name__ == "__main__":
    main()
