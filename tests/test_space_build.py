"""The Space as a Space builds it: `python -m hf_ddpm.space_deploy` to the local Hub server, the repo downloaded
into an empty folder, its requirements checked, and its app.py started by an interpreter that has the requirements but
not hf_ddpm (nor the repository on its path), then asked for images through gradio_client. And the folders a Space
could not build, each refused in one line before anything is uploaded."""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import pytest
from helpers import SPACE_DIR, generate_on_space, running_space, served_image
from isolated_env import isolated_python, run_python
from packaging.requirements import Requirement

import hf_ddpm
from hf_ddpm import space_deploy

IMPORT_PROBE = """
import diffusers, gradio, torch  # the Space's requirements: present
try:
    import hf_ddpm
except ModuleNotFoundError:
    print("no hf_ddpm")
else:
    print(hf_ddpm.__file__)
"""


def _requirement_lines(path: Path) -> list[str]:
    lines = (line.split(" #")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_deployed_space_builds_and_generates_without_hf_ddpm_installed(hub_server, tmp_path: Path, capsys):
    from gradio_client import Client
    from huggingface_hub import snapshot_download

    repo_id = "hf-ddpm-test/space-as-built"
    space_deploy.main(["--repo_id", repo_id, "--folder", str(SPACE_DIR)])
    assert f"to {hub_server.url}/spaces/{repo_id}" in capsys.readouterr().out
    space = tmp_path / "space"
    space.mkdir()
    snapshot_download(repo_id, repo_type="space", local_dir=space)

    # What the Space's `pip install -r requirements.txt` gets: the package's own dependencies, nothing unpublished.
    requirements = [Requirement(line) for line in _requirement_lines(space / "requirements.txt")]
    assert [str(r) for r in requirements] == space_deploy.package_requirements()
    assert not {"hf-ddpm", "gradio"} & {r.name.lower() for r in requirements}
    for requirement in requirements:  # the environment below is one that install could give
        assert requirement.specifier.contains(metadata.version(requirement.name), prereleases=True), requirement
    vendored = space / "hf_ddpm"
    assert (vendored / "_version.py").read_text() == (Path(hf_ddpm.__file__).parent / "_version.py").read_text()
    assert not list(space.rglob("__pycache__"))

    python = isolated_python(tmp_path / "venv")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_python(python, IMPORT_PROBE, cwd=empty).strip() == "no hf_ddpm"

    # The only hf_ddpm that interpreter can import is the copy beside app.py (the Space's folder is sys.path[0]).
    with running_space(tmp_path, app=space / "app.py", python=str(python)) as url:
        client = Client(url, verbose=False, download_files=False)
        status, x_t, _, gallery, grid_file = generate_on_space(client, steps=4, num_images=2).result(timeout=180)
        *_, forward_info = client.predict(0, None, 10, 0, api_name="/forward")  # the built-in digits load too
        assert status.startswith("**Done:** 2 images")
        assert len(gallery) == 2 and served_image(grid_file).size == served_image(x_t).size  # served while it runs
        assert "digit #0" in forward_info


def _space_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "hf-ddpm"
    shutil.copytree(SPACE_DIR, folder, ignore=shutil.ignore_patterns(".gradio", "__pycache__"))
    return folder


def _bad_requirement(line: str):
    return lambda folder: (folder / "requirements.txt").write_text(f"numpy>=1.24\n{line}\n")


BAD_FOLDERS = {
    "no app.py": (lambda folder: (folder / "app.py").unlink(), "missing app.py"),
    "no front matter": (
        lambda folder: (folder / "README.md").write_text("# hf-ddpm\n"),
        "front matter needs sdk: gradio, sdk_version and app_file: app.py",
    ),
    "unpublished hf-ddpm": (_bad_requirement("hf-ddpm==0.1.0"), "'hf-ddpm==0.1.0', which is on no package index"),
    "wheel path": (_bad_requirement("./dist/hf_ddpm-0.1.0-py3-none-any.whl"), "is not a requirement pip can install"),
    "local file url": (_bad_requirement("hf-tool @ file:///tmp/hf_tool.whl"), "is a local file"),
    "other requirements file": (_bad_requirement("-r more.txt"), "'-r more.txt' names a file"),
    "gradio listed": (_bad_requirement("gradio==6.31.0"), "Spaces install Gradio from sdk_version"),
    "hf_ddpm folder present": (lambda folder: (folder / "hf_ddpm").mkdir(), "hf_ddpm exists: the deploy vendors"),
    "no such folder": (lambda folder: shutil.rmtree(folder), "is not a folder: pass --folder"),
}


@pytest.mark.parametrize("case", list(BAD_FOLDERS))
def test_a_folder_a_space_could_not_build_is_named_and_nothing_uploaded(hub_server, tmp_path, capsys, case: str):
    from huggingface_hub import HfApi

    spoil, message = BAD_FOLDERS[case]
    folder = _space_copy(tmp_path)
    spoil(folder)
    repo_id = f"hf-ddpm-test/bad-{case.replace(' ', '-').replace('.', '')}"
    with pytest.raises(SystemExit) as exit_info:
        space_deploy.main(["--repo_id", repo_id, "--folder", str(folder)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert str(folder) in err and "hf-ddpm-space-" not in err  # the user's folder, not the temporary upload
    assert not HfApi().repo_exists(repo_id, repo_type="space")  # nothing created, nothing uploaded


def test_vendoring_that_fails_is_named_and_nothing_uploaded(hub_server, tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    nowhere = tmp_path / "site-packages" / "hf_ddpm"
    monkeypatch.setattr(hf_ddpm, "__file__", str(nowhere / "__init__.py"))  # e.g. a package inside a zip
    with pytest.raises(ValueError, match=f"cannot vendor hf_ddpm from {nowhere}"):
        space_deploy.deploy_space("hf-ddpm-test/bad-vendoring", _space_copy(tmp_path))
    assert not HfApi().repo_exists("hf-ddpm-test/bad-vendoring", repo_type="space")


def test_requirements_of_an_installed_package_come_from_its_metadata(tmp_path):
    """Outside a checkout (the package installed from its wheel), the distribution's metadata is the source: its
    dependencies and the `space` extra, with the extra's marker dropped; other extras, Gradio and hf-ddpm left out."""
    installed = tmp_path / "site-packages" / "hf_ddpm"
    lines = space_deploy.package_requirements(installed)
    names = [Requirement(line).name.lower() for line in lines]
    assert {"torch", "diffusers", "matplotlib"} <= set(names) and len(names) == len(set(names))
    assert not {"gradio", "hf-ddpm", "tensorboard", "pytest"} & set(names)
    assert all(Requirement(line).marker is None for line in lines)
    declared = [Requirement(r) for r in metadata.requires("hf-ddpm")]
    assert {r.name.lower() for r in declared if r.marker is None} <= set(names)
