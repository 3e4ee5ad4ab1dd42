"""`--eval_steps`: the `Evaluator` of `python -m hf_ddpm.evaluate` (bits/dim, FID; `hf_ddpm.evaluator`) with a small
budget, shared by every process (each on its share of the images and samples, gathered on the main process).

The real images are the first `--eval_num_samples` rows of the training data, unaugmented (center crop, no flip),
loaded once per run; FID's statistics of them are computed once (and cached on disk, keyed by their hash).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from ..evaluator import METRICS, EvalConfig, Evaluator, Shard, first_images
from ..fid import ExtractorUnavailableError, check_features
from ..losses import LossTerms
from ..pipeline import HFDDPMPipeline

NO_METRICS = "none"


def builtin_digits(args: argparse.Namespace) -> bool:
    """Whether the run trains on the built-in digits (no dataset flag)."""
    return args.dataset_name is None and args.train_data_dir is None


def eval_features(args: argparse.Namespace) -> str | None:
    """FID features of the run: `--eval_features`, else 'digits' on the built-in digits, else None (no FID)."""
    if args.eval_features:
        return args.eval_features
    return "digits" if builtin_digits(args) else None


def eval_metrics(args: argparse.Namespace) -> list[str]:
    """`--eval_metrics` as a list ([] for 'none'); None (the default) is bpd,fid, or bpd where FID has no features."""
    if args.eval_metrics is None:
        return ["bpd", "fid"] if eval_features(args) is not None else ["bpd"]
    names = [m.strip() for m in args.eval_metrics.split(",") if m.strip()]
    return [] if names == [NO_METRICS] else names


def validate_eval_args(args: argparse.Namespace) -> None:
    """Raise a ValueError naming the flag for an evaluation flag that cannot work."""
    if args.eval_num_samples < 2:
        raise ValueError(f"--eval_num_samples must be >= 2 (FID needs a covariance), got {args.eval_num_samples}.")
    if not 1 <= args.eval_sample_steps <= args.ddpm_num_steps:
        raise ValueError(
            f"--eval_sample_steps must lie in [1, --ddpm_num_steps {args.ddpm_num_steps}], got {args.eval_sample_steps}."
        )
    metrics = eval_metrics(args)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or (args.eval_metrics is not None and not metrics and args.eval_metrics.strip() != NO_METRICS):
        raise ValueError(
            f"--eval_metrics {args.eval_metrics!r}: unknown {unknown or 'empty list'}; give a comma-separated list "
            f"of {', '.join(METRICS)}, or {NO_METRICS} (the fixed-batch loss only)."
        )
    if args.eval_features is not None:
        try:
            check_features(args.eval_features)
        except ValueError as err:
            raise ValueError(f"--eval_features: {err}") from err
    if "fid" in metrics and eval_features(args) is None:
        raise ValueError(
            "--eval_metrics fid needs --eval_features (inception, dinov2[:MODEL_ID_OR_PATH] or digits) for a dataset "
            "other than the built-in digits."
        )


def build_evaluator(
    args: argparse.Namespace, dataset: Any, image_column: str, channels: int, accelerator: Accelerator
) -> Evaluator | None:
    """The run's evaluator (on every process), or None when `--eval_steps` is 0 or `--eval_metrics` is none.

    `dataset` is the loaded training data before `prepare_dataset`. Raises ValueError for data or features that
    cannot be used (e.g. Inception weights missing offline), before training starts."""
    metrics = eval_metrics(args)
    if not args.eval_steps or not metrics:
        return None
    real = first_images(dataset, args.resolution, channels, args.eval_num_samples, image_column)
    name = "digits:train" if builtin_digits(args) else (args.dataset_name or args.train_data_dir)
    shard = Shard(accelerator.process_index, accelerator.num_processes, lambda obj: gather_object([obj]))
    config = EvalConfig(
        metrics=metrics,
        num_samples=args.eval_num_samples,
        scheduler="ddim",
        steps=args.eval_sample_steps,
        eta=0.0,
        features=eval_features(args) or "",
        dataset_key=f"{name}@{args.resolution}",
        bpd_mode=args.eval_bpd_mode,
        seed=args.seed,
    )
    try:
        return Evaluator(real, config, shard=shard, device=accelerator.device)
    except ExtractorUnavailableError as err:
        raise ValueError(f"--eval_features {eval_features(args)}: {err}") from err


def eval_logs(result: dict[str, Any] | None) -> dict[str, float]:
    """The tracker scalars of an `Evaluator` result (None: {})."""
    if result is None:
        return {}
    keys = ("bpd", "bpd_stderr", "bpd_images", "fid", "fid_samples")
    return {f"eval/{key}": result[key] for key in keys if key in result}


@torch.no_grad()
def evaluate_models(
    models: dict[str, torch.nn.Module],
    evaluator: Evaluator | None,
    fixed_batch: dict[str, torch.Tensor] | None,
    loss_terms: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.nn.Module], LossTerms],
    noise_scheduler: Any,
) -> dict[str, float]:
    """The eval/* figures of one evaluation; every process calls it. The loss of each of `models` ({name: U-Net},
    the saved weights first) on `fixed_batch` ({"x0", "noise", "t"}, where given), and `evaluator`'s metrics of the
    first model in a pipeline with `noise_scheduler` (on process 0; {} from the others). Each model is evaluated in
    eval mode and left in the mode it had."""
    modes = {name: unet.training for name, unet in models.items()}
    first = next(iter(models.values()))
    logs: dict[str, float] = {}
    try:
        for unet in models.values():
            unet.eval()
        if fixed_batch is not None:
            x0, noise, t = (fixed_batch[k].to(first.device) for k in ("x0", "noise", "t"))
            for name, unet in models.items():
                logs[f"eval/loss_{name}"] = float(loss_terms(x0, noise, t, unet).loss.mean())
        if evaluator is not None:
            pipe = HFDDPMPipeline(unet=first, scheduler=noise_scheduler)
            pipe.set_progress_bar_config(disable=True)
            logs.update(eval_logs(evaluator(pipe)))
    finally:
        for name, unet in models.items():
            unet.train(modes[name])
    return logs
