"""The model and noise schedule of a run, built from its flags, and the run's signature for resuming."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..diffusion import LEARNED_VARIANCE_TYPES
from ..models.unet import UNET_PRESETS, DDPMUNet
from ..schedulers import DDPMPosteriorScheduler


def unet_config(args: argparse.Namespace, channels: int) -> dict[str, Any]:
    """The DDPMUNet config of the run: the U-Net preset at `--resolution`, with attention kept at the same levels
    (a preset's attention resolutions are relative to its own sample size), then `--unet_overrides`."""
    preset = dict(UNET_PRESETS[args.unet_preset])
    # Attention at the same depth: a 16x16 preset with attention at 8x8 gets it at 16x16 when trained at 32x32.
    scale = args.resolution / preset["sample_size"]
    attention = tuple(int(r * scale) for r in preset["attention_resolutions"])
    if any(r * scale != int(r * scale) for r in preset["attention_resolutions"]):
        attention = preset["attention_resolutions"]  # not a power-of-two rescale: let the U-Net's check speak
    config = {
        **preset,
        "sample_size": args.resolution,
        "attention_resolutions": attention,
        "in_channels": channels,
        "out_channels": channels,
        "dropout": args.dropout,
        "learned_variance": args.variance_type in LEARNED_VARIANCE_TYPES,
    }
    config.update(args.unet_overrides or {})
    return config


def build_unet(args: argparse.Namespace, channels: int) -> DDPMUNet:
    """The U-Net to train; a ValueError names the flags when the resolution (or an override) does not fit it."""
    config = unet_config(args, channels)
    try:
        return DDPMUNet(**config)
    except (ValueError, TypeError) as err:
        raise ValueError(
            f"--resolution {args.resolution} cannot be used with the U-Net preset {args.unet_preset!r}"
            f"{' and --unet_overrides' if args.unet_overrides else ''}: {err}"
        ) from err


def build_noise_scheduler(args: argparse.Namespace) -> DDPMPosteriorScheduler:
    """The training process (and the scheduler saved in the pipeline): β schedule, T, prediction/variance type,
    and the spacing of sampling steps (which training does not use)."""
    return DDPMPosteriorScheduler(
        num_train_timesteps=args.ddpm_num_steps,
        beta_schedule=args.ddpm_beta_schedule,
        prediction_type=args.prediction_type,
        variance_type=args.variance_type,
        timestep_spacing=args.timestep_spacing,
    )


def _plain(value: Any) -> Any:
    """JSON round trip, so that tuples and lists (and numpy scalars) compare equal to what was stored."""
    return json.loads(json.dumps(value, default=str))


def _dataset_identity(args: argparse.Namespace, num_rows: int | None) -> dict[str, Any]:
    name = args.dataset_name
    if name is not None and os.path.exists(os.path.expanduser(name)):
        name = os.path.abspath(os.path.expanduser(name))
    data_dir = os.path.abspath(os.path.expanduser(args.train_data_dir)) if args.train_data_dir else None
    return {
        "dataset_name": name,
        "dataset_config_name": args.dataset_config_name,
        "train_data_dir": data_dir,
        "image_column": args.image_column,
        "num_rows": num_rows,
    }


def run_signature(
    args: argparse.Namespace,
    unet: DDPMUNet,
    scheduler: DDPMPosteriorScheduler,
    num_processes: int,
    num_rows: int | None,
) -> dict[str, Any]:
    """The settings a checkpoint can only be resumed under: the model and process (else the weights do not load
    or mean something else), the loss, and what fixes the data order (else `skip_first_batches` skips the wrong
    batches). Learning rate, step counts, logging and outputs may change between runs.

    A `--streaming` run (`num_rows` None: a stream is not counted) adds a `streaming` entry: its data order also
    depends on the shuffle buffer and on how the DataLoader workers split the shards. A map-style run has no such
    entry, so neither kind of checkpoint is resumed as the other."""
    unet_cfg = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    sched_keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type", "variance_type")
    return _plain(
        {
            "unet": unet_cfg,
            "scheduler": {k: scheduler.config[k] for k in sched_keys},
            "loss_type": args.loss_type,
            "snr_gamma": args.snr_gamma,
            "resolution": args.resolution,
            "center_crop": args.center_crop,
            "random_flip": args.random_flip,
            "train_batch_size": args.train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "num_processes": num_processes,
            "mixed_precision": args.mixed_precision,
            "use_ema": args.use_ema,
            "seed": args.seed,
            "dataset": _dataset_identity(args, num_rows),
            **(_stream_identity(args) if args.streaming else {}),
        }
    )


def _stream_identity(args: argparse.Namespace) -> dict[str, Any]:
    stream = {"shuffle_buffer_size": args.shuffle_buffer_size, "dataloader_num_workers": args.dataloader_num_workers}
    return {"streaming": stream}


def signature_differences(stored: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable 'key: checkpoint=A, now=B' lines for every differing leaf."""
    lines = []
    for key in sorted(set(stored) | set(current)):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += signature_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: checkpoint={a!r}, now={b!r}")
    return lines
