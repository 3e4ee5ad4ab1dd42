"""Resumable checkpoints: `accelerator.save_state` written atomically, rotation, and resuming with a config check.

A checkpoint is `output_dir/checkpoint-<step>/`: accelerate's files (model, optimizer, per-process RNG states, the
registered LR schedule and EMA) plus `hf_ddpm_checkpoint.json` (the step and the run signature) and, for a
`--streaming` run, `stream_state_rank<N>.json` per process (where that process is in its part of the stream: the
processes' parts differ, so each writes its own, as accelerate's `random_states_<N>.pkl`). It is written to
`checkpoint-<step>.tmp` and renamed when complete, so a folder named `checkpoint-<step>` is always whole; a
killed run leaves at most a `.tmp` folder, which the next run removes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from .components import signature_differences
from .output import replace_path

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "hf_ddpm_checkpoint.json"
STREAM_STATE_FILE = "stream_state_rank{rank}.json"
_COMPLETE = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
_PARTIAL = re.compile(rf"^{CHECKPOINT_PREFIX}\d+\.(tmp|old)$")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _COMPLETE.match(p.name)) and p.is_dir()]
    return sorted(found)


def remove_partial_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete `checkpoint-*.tmp` / `.old` folders that an interrupted save left behind; returns them."""
    folder = Path(output_dir)
    partial = [p for p in folder.iterdir() if _PARTIAL.match(p.name)] if folder.is_dir() else []
    for path in partial:
        logger.warning("removing the incomplete checkpoint %s (an interrupted save)", path)
        shutil.rmtree(path, ignore_errors=True)
    return partial


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    signature: dict[str, Any],
    total_limit: int | None = None,
    progress: dict[str, Any] | None = None,
    stream_state: dict[str, Any] | None = None,
) -> Path:
    """`accelerator.save_state` into `checkpoint-<step>.tmp`, then rename to `checkpoint-<step>`; keep at most
    `total_limit` checkpoints. Every process must call it (each writes its own RNG state and `stream_state`, its
    position in its part of a stream); the main process renames and rotates. `progress` (the run's running
    measurements) is stored beside the step."""
    folder = Path(output_dir)
    final = folder / f"{CHECKPOINT_PREFIX}{step}"
    tmp = folder / f"{final.name}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if stream_state is not None:
        (tmp / STREAM_STATE_FILE.format(rank=accelerator.process_index)).write_text(json.dumps(stream_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": step, "signature": signature, "progress": progress or {}}
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
        replace_path(tmp, final)  # an earlier run's checkpoint of the same step is swapped out, then dropped
        if total_limit is not None:
            for _, path in list_checkpoints(folder)[:-total_limit]:
                logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", path, total_limit)
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    return final


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from: str | None) -> Path | None:
    """The checkpoint folder for `--resume_from_checkpoint`: None (fresh run), 'latest' (the newest complete one,
    or None when there is none yet) or a path. Raises ValueError for a path that is not a complete checkpoint."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("no checkpoint in %s yet: starting a new run", output_dir)
            return None
        return found[-1][1]
    path = Path(resume_from)
    if not path.is_dir():
        raise ValueError(f"--resume_from_checkpoint {resume_from!r} does not exist (or is not a folder).")
    if not (path / STATE_FILE).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {resume_from!r} is not a complete hf_ddpm checkpoint (no {STATE_FILE}); "
            "it may be a partial save from an interrupted run."
        )
    return path


def read_checkpoint_state(path: str | os.PathLike) -> dict[str, Any]:
    """The step and run signature stored in a checkpoint."""
    return json.loads((Path(path) / STATE_FILE).read_text())


def read_stream_state(path: str | os.PathLike, rank: int) -> dict[str, Any]:
    """Process `rank`'s position in its part of the stream, stored in a `--streaming` run's checkpoint.

    Raises:
        ValueError: the checkpoint holds no position for that process.
    """
    file = Path(path) / STREAM_STATE_FILE.format(rank=rank)
    if not file.is_file():
        raise ValueError(f"checkpoint {os.fspath(path)!r} holds no stream position for process {rank} ({file.name})")
    return json.loads(file.read_text())


def check_checkpoint_signature(path: str | os.PathLike, signature: dict[str, Any]) -> int:
    """The checkpoint's global step, after checking that it was written by a run with the same signature.

    Raises:
        ValueError: listing every setting that differs, so that a checkpoint of another model, process, loss
            or data order is never loaded into this run.
    """
    state = read_checkpoint_state(path)
    differences = signature_differences(state["signature"], signature)
    if differences:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} was written by a run with another config; it cannot be resumed "
            "with these flags:\n  " + "\n  ".join(differences) + "\nPass the same flags as that run, or train into "
            "a fresh --output_dir (without --resume_from_checkpoint)."
        )
    return int(state["global_step"])
