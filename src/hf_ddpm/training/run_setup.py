"""A run's inputs, loaded and checked before anything is written: data, model, scheduler, checkpoint, evaluator.

Every check that can fail because of the user's flags, data or output folder runs here, so that a bad run stops
before its first file (`TrainingInputError` in `train`).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from ..data import find_image_column, infer_channels, load_image_dataset, prepare_dataset, shard_stream
from ..evaluator import Evaluator, first_images
from ..models.unet import DDPMUNet
from ..schedulers import DDPMPosteriorScheduler
from .checkpoints import check_checkpoint_signature, list_checkpoints, read_checkpoint_state, resolve_checkpoint
from .components import build_noise_scheduler, build_unet, run_signature
from .distributed import check_stream_parts
from .output import check_output_dir
from .periodic_eval import build_evaluator


@dataclass
class RunSetup:
    """What `setup_run` loaded and checked, for the trainer."""

    dataset: datasets.Dataset | datasets.IterableDataset  # a stream: this process's part of it (--streaming)
    channels: int
    unet: DDPMUNet
    noise_scheduler: DDPMPosteriorScheduler
    signature: dict[str, Any]
    checkpoint: Path | None
    resume_step: int
    progress: dict[str, Any]  # the resumed run's measurements so far (empty for a new run)
    evaluator: Evaluator | None = None  # --eval_metrics at each --eval_steps, on every process
    calibration_images: torch.Tensor | None = None  # --calibrate_variance: [N, C, R, R] in [-1, 1], unaugmented


def setup_run(args: argparse.Namespace, accelerator: Accelerator) -> RunSetup:
    """Everything that can fail because of the user's input, checked before anything is written.

    Raises:
        ValueError, OSError, ImportError: flags, data or output folder that cannot work (`train` reports them as
            `TrainingInputError`).
    """
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir)
    with accelerator.main_process_first():  # the first process fills the datasets cache, the others read it
        raw = load_image_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            args.image_column,
            cache_dir=args.cache_dir,
            streaming=args.streaming,
        )
    column = find_image_column(raw, args.image_column)
    channels = args.channels or infer_channels(raw, column)  # from the whole stream's first rows: alike everywhere
    part = raw
    if args.streaming:
        rank, world_size = accelerator.process_index, accelerator.num_processes
        part = shard_stream(raw, rank, world_size, args.seed, args.shuffle_buffer_size)
        if world_size > 1:
            check_stream_parts(raw, accelerator)
    # Workers get a fresh copy of the transform each epoch (they are not persistent, see `set_epoch`): no cache there.
    cache_mb = args.cache_images_mb if not args.streaming and args.dataloader_num_workers == 0 else 0
    dataset = prepare_dataset(
        part, column, args.resolution, args.center_crop, args.random_flip, channels, seed=args.seed,
        cache_bytes=cache_mb * 2**20,
    )  # fmt: skip
    set_seed(args.seed)  # the same initial weights on every process
    unet = build_unet(args, channels)
    noise_scheduler = build_noise_scheduler(args)
    num_rows = None if args.streaming else len(raw)
    signature = run_signature(args, unet, noise_scheduler, accelerator.num_processes, num_rows)
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    resume_step = check_checkpoint_signature(checkpoint, signature) if checkpoint is not None else 0
    earlier = list_checkpoints(output_dir)
    if args.resume_from_checkpoint is None and earlier:
        # Two runs' checkpoints in one folder would be rotated and resumed as one run.
        names = ", ".join(p.name for _, p in earlier)
        raise ValueError(
            f"--output_dir {args.output_dir!r} already holds checkpoints of an earlier run ({names}). Pass "
            "--resume_from_checkpoint latest to continue it, or use a new --output_dir (or delete them) to start over."
        )
    progress = read_checkpoint_state(checkpoint).get("progress", {}) if checkpoint is not None else {}
    evaluator = build_evaluator(args, raw, column, channels, accelerator)  # last: it may be slow
    calibration_images = None
    if args.calibrate_variance and accelerator.is_main_process:
        calibration_images = first_images(raw, args.resolution, channels, args.calibrate_variance, column)
        if len(calibration_images) < 3:
            raise ValueError(
                f"--calibrate_variance {args.calibrate_variance}: only {len(calibration_images)} readable images."
            )
    return RunSetup(
        dataset, channels, unet, noise_scheduler, signature, checkpoint, resume_step, progress, evaluator=evaluator,
        calibration_images=calibration_images,
    )  # fmt: skip
