"""The `train.py` command (also `python -m hf_ddpm.training`): flags in, one line out, and an exit code for each
way a run stops early (2: bad input, 1: diverged)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

from .args import parse_args
from .errors import TrainingDiverged, TrainingInputError
from .loop import TrainResult, train


def configure_logging() -> None:
    """INFO on the main process, warnings only on the others (RANK is set by accelerate launch / torchrun)."""
    main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if main else logging.WARNING,
    )
    for name in ("accelerate", "torch", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """The `train.py` command: parse flags, train, and turn input errors into a one-line message (exit code 2)
    and divergence into exit code 1."""
    args = parse_args(argv)
    configure_logging()
    try:
        result = train(args)
    except TrainingInputError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingDiverged as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if int(os.environ.get("RANK", "0")) == 0:
        m = result.metrics
        print(
            f"done: {m.global_step} steps, final loss {m.final_loss if m.final_loss is None else round(m.final_loss, 4)}, "
            f"{m.train_seconds:.0f} s, {m.images_per_second:.1f} images/s; pipeline in {result.output_dir}"
            + (f"; pushed to {result.repo_id}" if result.repo_id else "")
        )
    return result
