"""The output folder: whose it is, and writing into it so that a crash never leaves a half-written file.

`--output_dir` becomes an `HFDDPMPipeline` folder (`model_index.json`, `unet/`, `scheduler/`) plus the model card,
sample grids, logs and checkpoints. We only write into a folder that is empty, new, or ours: one holding our run
marker (`training_config.json`) or an `HFDDPMPipeline` `model_index.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline

from ..atomic_files import atomic_write

RUN_CONFIG_FILE = "training_config.json"
MARKER_KEY = "hf_ddpm_training"
PIPELINE_CLASS = "HFDDPMPipeline"
_OLD = ".old"


def _is_ours(folder: Path) -> bool:
    try:
        if MARKER_KEY in json.loads((folder / RUN_CONFIG_FILE).read_text()):
            return True
    except (OSError, ValueError):
        pass
    try:
        return json.loads((folder / "model_index.json").read_text()).get("_class_name") == PIPELINE_CLASS
    except (OSError, ValueError, AttributeError):
        return False


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Raise a ValueError unless `output_dir` is new, empty, or holds an hf_ddpm run or HFDDPMPipeline."""
    folder = Path(output_dir)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ValueError(f"--output_dir {os.fspath(output_dir)!r} is a file, not a folder.")
    entries = sorted(os.listdir(folder))
    if entries and not _is_ours(folder):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ValueError(
            f"--output_dir {os.fspath(output_dir)!r} is not empty and holds no hf_ddpm training run or "
            f"{PIPELINE_CLASS} (found: {shown}); refusing to write into it. Choose a new or empty folder."
        )


def write_run_config(output_dir: str | os.PathLike, config: dict[str, Any]) -> None:
    """Write the run's flags as `training_config.json`, which also marks the folder as ours."""
    atomic_write(Path(output_dir) / RUN_CONFIG_FILE, json.dumps({MARKER_KEY: 1, **config}, indent=2, default=str))


def clean_interrupted_writes(output_dir: str | os.PathLike) -> None:
    """Undo what a crash mid-write left: a `.<name>.old` whose `<name>` is missing is put back (the previous
    complete component of an interrupted swap), a stale one is removed, and `.*.tmp` files and folders go."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return
    for old in folder.glob(f".*{_OLD}"):
        current = folder / old.name[1 : -len(_OLD)]
        if current.exists():
            _remove(old)
        else:
            os.replace(old, current)
    for sub in (folder, folder / "samples"):
        for tmp in sub.glob(".*.tmp") if sub.is_dir() else ():
            _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def replace_path(src: Path, dst: Path) -> None:
    """Move `src` onto `dst`; a folder is swapped through `.<name>.old` (renames only, no copying), which
    `clean_interrupted_writes` puts back if a crash falls between the two renames."""
    if dst.is_dir():
        old = dst.with_name(f".{dst.name}{_OLD}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
        os.replace(src, dst)
        shutil.rmtree(old)
    else:
        os.replace(src, dst)


def save_pipeline(pipeline: DiffusionPipeline, output_dir: str | os.PathLike) -> None:
    """`pipeline.save_pretrained` into a temporary folder inside `output_dir`, then rename each component into
    place, `model_index.json` last: a reader never sees a half-written weights file or config."""
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".pipeline-", suffix=".tmp", dir=folder))
    try:
        pipeline.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp), key=lambda n: (n == "model_index.json", n)):
            replace_path(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
