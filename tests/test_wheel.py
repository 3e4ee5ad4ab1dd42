"""The package as a user installs it: `python -m build` makes an sdist and a wheel; the wheel, installed (not
editable) into an environment without the repository, trains, saves, reloads through diffusers and samples."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from helpers import tiny_args
from isolated_env import clean_env, isolated_python, run_python

import hf_ddpm

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / "src" / "hf_ddpm"

# Run in the isolated environment, from a folder outside the repository: where hf_ddpm comes from, and whether what
# its wheel declares (dependencies and the `train` extra used below) is installed there.
WHERE_AND_REQUIREMENTS = """
import json, sys
from importlib import metadata
from pathlib import Path
from packaging.requirements import Requirement
import hf_ddpm
unmet = []
for line in metadata.requires("hf-ddpm"):
    req = Requirement(line)
    if req.marker is None or req.marker.evaluate({"extra": "train"}):
        try:
            found = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            found = None
        if found is None or not req.specifier.contains(found, prereleases=True):
            unmet.append(f"{req} (found {found})")
dist = metadata.distribution("hf-ddpm")
print(json.dumps({"file": hf_ddpm.__file__, "version": hf_ddpm.__version__, "metadata_version": dist.version,
                  "dist_path": str(dist.locate_file("")), "unmet": unmet, "sys_path": sys.path}))
"""

# Reload the trained folder through diffusers, as the model card shows (importing hf_ddpm registers its classes).
RELOAD_AND_SAMPLE = """
import json, sys, torch
import hf_ddpm
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
images = pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
module = sys.modules[type(pipe).__module__]
print(json.dumps({"class": type(pipe).__name__, "module_file": module.__file__, "shape": list(images.shape),
                  "finite": bool(torch.isfinite(torch.as_tensor(images)).all())}))
"""


@pytest.fixture(scope="module")
def dist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`python -m build`'s sdist and wheel (the wheel built from the sdist, so the sdist is complete too).

    --no-isolation builds with this environment's setuptools instead of downloading one per build."""
    out = tmp_path_factory.mktemp("dist")
    cmd = [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO_ROOT)]
    result = subprocess.run(cmd, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return out


def test_sdist_and_wheel_hold_the_whole_package(dist_dir: Path):
    version = hf_ddpm.__version__
    wheel = dist_dir / f"hf_ddpm-{version}-py3-none-any.whl"
    sdist = dist_dir / f"hf_ddpm-{version}.tar.gz"
    assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in dist_dir.iterdir())
    package_files = {
        p.relative_to(PACKAGE_DIR.parent).as_posix()
        for p in PACKAGE_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    wheel_files = set(zipfile.ZipFile(wheel).namelist())
    assert package_files <= wheel_files, package_files - wheel_files
    with tarfile.open(sdist) as tar:
        sdist_files = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert {f"src/{name}" for name in package_files} | {"pyproject.toml", "README.md", "LICENSE"} <= sdist_files
    meta = zipfile.ZipFile(wheel).read(f"hf_ddpm-{version}.dist-info/METADATA").decode()
    assert f"Version: {version}\n" in meta  # read from hf_ddpm/_version.py, the one place it is written
    assert "Requires-Dist: torch" in meta and 'Requires-Dist: scikit-learn>=1.3; extra == "space"' in meta


def test_installed_wheel_trains_saves_reloads_and_samples(dist_dir: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    python = isolated_python(venv)
    outside = tmp_path / "elsewhere"  # the working folder: not the repository, nothing importable in it
    outside.mkdir()
    wheel = next(dist_dir.glob("hf_ddpm-*.whl"))
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", str(wheel)]
    result = subprocess.run(install, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr

    found = json.loads(run_python(python, WHERE_AND_REQUIREMENTS, cwd=outside))
    assert Path(found["file"]).is_relative_to(venv), found["file"]  # the wheel's copy, not src/
    assert not any(Path(p).resolve() == REPO_ROOT / "src" for p in found["sys_path"] if p)
    assert Path(found["dist_path"]).is_relative_to(venv)
    assert found["version"] == found["metadata_version"] == hf_ddpm.__version__
    assert found["unmet"] == []

    out = outside / "tiny-ddpm"
    train = [str(python), "-m", "hf_ddpm.training", *tiny_args(out, steps=3)]
    result = subprocess.run(train, cwd=outside, env=clean_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(out.rglob("*.bin"))  # safetensors only

    sampled = json.loads(run_python(python, RELOAD_AND_SAMPLE.replace("sys.argv[1]", repr(str(out))), cwd=outside))
    assert sampled["class"] == "HFDDPMPipeline"
    assert Path(sampled["module_file"]).is_relative_to(venv)
    assert sampled["shape"] == [2, 8, 8, 1] and sampled["finite"]
