"""What each save hands the user (main process): the pipeline folder (the pipeline, `training_metrics.json`, the
model card), each file written whole, then, with --push_to_hub, the folder pushed to the Hub repo."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from diffusers import DiffusionPipeline

from ..atomic_files import atomic_write
from .hub import push_folder
from .model_card import TrainingMetrics, write_model_card
from .output import save_pipeline

logger = logging.getLogger(__name__)

METRICS_FILE = "training_metrics.json"


def write_pipeline_folder(output_dir: Path, pipeline: DiffusionPipeline, metrics: TrainingMetrics, card: str) -> None:
    """The pipeline, its measurements as METRICS_FILE and the model card `card` (README.md) into `output_dir`."""
    save_pipeline(pipeline, output_dir)
    atomic_write(output_dir / METRICS_FILE, json.dumps(asdict(metrics), indent=2))
    write_model_card(output_dir, card)


def push_step(output_dir: Path, repo_id: str, step: int, final: bool) -> None:
    """Push `output_dir` to `repo_id` as the state at `step`. A failed push is retried at the next save, so it is a
    warning, except at the final save (`final`): then a RuntimeError says the folder is complete but not pushed."""
    try:
        url = push_folder(output_dir, repo_id, f"hf_ddpm training: step {step}")
        logger.info("pushed step %d to %s", step, url)
    except Exception as err:
        if final:
            raise RuntimeError(
                f"training finished and {output_dir} is complete, but pushing it to the Hub repo {repo_id!r} failed: "
                f"{err}"
            ) from err
        logger.warning("pushing step %d to %s failed (will retry at the next save): %s", step, repo_id, err)
