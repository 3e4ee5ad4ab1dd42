"""A Python environment without the editable hf_ddpm: for testing the package as a user installs it (the wheel) and
the Space as a Space runs it (the vendored copy), without installing every dependency again from the index.

`isolated_python` makes a fresh venv (no pip: the test environment's pip installs into it with `--python`) and puts
the test environment's site-packages on its path through a `.pth` file. A path line in a `.pth` file adds the folder
to sys.path but does not process the `.pth` files inside it, so the editable install's `__editable__.hf_ddpm-*.pth`
(which points at src/) is not applied: torch, diffusers and the rest import, hf_ddpm does not.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path


def isolated_python(venv_dir: Path) -> Path:
    """Create the venv at `venv_dir` and return its interpreter (its site-packages first, then ours)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv_dir)], check=True)
    python = venv_dir / "bin" / "python"
    site_packages = Path(run_python(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])").strip())
    assert site_packages.is_relative_to(venv_dir), site_packages
    (site_packages / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def clean_env(**extra: str) -> dict[str, str]:
    """This process' environment without anything that would put the repository on a child's path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONNOUSERSITE="1", OMP_NUM_THREADS="1", **extra)
    return env


def run_python(python: Path, code: str, cwd: Path | None = None, timeout: float = 300, **env: str) -> str:
    """Run `code` with `python` (in `cwd`, default the interpreter's venv) and return its stdout; fail with its
    output if it fails."""
    result = subprocess.run(
        [str(python), "-c", code],
        cwd=cwd or python.parent.parent,
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, f"exit code {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result.stdout
