"""Calibrate a model for the analytic reverse variance (Bao et al. 2022, Analytic-DPM): Γ_t = E‖ε_θ(x_t, t)‖²/d.

    python -m hf_ddpm.calibrate --model outputs/digits-ddpm --num_samples 8
    python -m hf_ddpm.calibrate --model user/repo --dataset user/images --num_samples 64 --output calibrated/

Γ_t is a Monte Carlo mean over data x_0 and noise ε of the model's ε-estimate at x_t = √ᾱ_t x_0 + √(1-ᾱ_t) ε, for
every training timestep t. It is written into the pipeline's scheduler config as `analytic_gamma`, so
`save_pretrained` / `push_to_hub` / `from_pretrained` carry it and `analytic_variance=True` can use it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .atomic_files import atomic_write
from .diffusion import GaussianDiffusion, model_output_to_eps, split_model_output
from .progress import progress_bar
from .schedulers import PosteriorSchedulerBase

Model = Callable[[torch.Tensor, torch.Tensor], Any]
# The regression estimator fits a line through the draws of each t: its error needs n - 2 >= 1.
MIN_SAMPLES = 3
# Γ is saved to this many significant digits: far below any Monte Carlo error, and a readable config.
SAVED_DIGITS = 7


@dataclass
class GammaEstimate:
    """Γ_t for every training timestep with its Monte Carlo standard error.

    Args:
        gamma: [T] float64, Γ_t = E‖ε_θ(x_t, t)‖²/d.
        stderr: [T] float64, the Monte Carlo standard error of each Γ_t.
        num_samples: draws (image, noise) per timestep.
    """

    gamma: torch.Tensor
    stderr: torch.Tensor
    num_samples: int

    def summary(self) -> dict[str, float | int]:
        """The figures a user checks: mean Γ, the largest and mean standard error and where the largest sits."""
        worst = int(self.stderr.argmax())
        return {
            "num_timesteps": len(self.gamma),
            "num_samples": self.num_samples,
            "gamma_mean": float(self.gamma.mean()),
            "stderr_max": float(self.stderr[worst]),
            "stderr_max_timestep": worst,
            "stderr_mean": float(self.stderr.mean()),
        }


def _model_dtype_device(model: Model, like: torch.Tensor) -> tuple[torch.dtype, torch.device]:
    if isinstance(model, torch.nn.Module):
        parameter = next(model.parameters(), None)
        if parameter is not None:
            return parameter.dtype, parameter.device
    return like.dtype, like.device


@torch.no_grad()
def estimate_gamma(
    model: Model,
    process: GaussianDiffusion,
    images: torch.Tensor,
    prediction_type: str = "epsilon",
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: bool = True,
) -> GammaEstimate:
    """Γ_t = E‖ε_θ(x_t, t)‖²/d for every t of `process`, each from all of `images` with fresh noise.

    images: [M, C, H, W] data as the model sees it (e.g. in [-1, 1]), M >= 3. The T·M pairs (t, image) run through
    the model in batches of `batch_size` mixing timesteps; x_0 / v outputs are converted to ε (`model_output_to_eps`);
    a learned-variance half of the output is ignored. The noise comes from `generator` (on the CPU). Each Γ_t is the
    regression estimate with the noise's own ‖ε‖²/d as control variate (`_regression_estimate`).
    """
    num_images = images.shape[0]
    if num_images < MIN_SAMPLES:
        raise ValueError(f"estimate_gamma needs at least {MIN_SAMPLES} images per timestep, got {num_images}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    T = process.num_timesteps
    dtype, device = _model_dtype_device(model, images)
    data = images.to(device=device, dtype=torch.float64)
    # per t: Σa, Σb, Σa², Σb², Σab of a = ‖ε̂‖²/d and b = ‖ε‖²/d
    sums = torch.zeros(5, T, dtype=torch.float64, device=device)
    total = T * num_images
    for start in progress_bar(range(0, total, batch_size), disable=not progress, desc="calibrating Γ", unit="batch"):
        pairs = torch.arange(start, min(start + batch_size, total), device=device)
        t, x0 = pairs // num_images, data[pairs % num_images]
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(device)
        x_t = process.q_sample(x0, t, noise)
        output = model(x_t.to(dtype), t)
        output = (output.sample if hasattr(output, "sample") else output).to(torch.float64)
        prediction, _ = split_model_output(output, x0.shape[1])
        eps = model_output_to_eps(prediction, x_t, process.alpha_bar(t, x_t), prediction_type)
        a, b = eps.pow(2).flatten(1).mean(1), noise.pow(2).flatten(1).mean(1)  # [B] each
        sums.index_add_(1, t, torch.stack([a, b, a * a, b * b, a * b]))
    gamma, stderr = _regression_estimate(*sums, num_images)
    return GammaEstimate(gamma.cpu(), stderr.cpu(), num_images)


def _regression_estimate(
    sum_a: torch.Tensor,
    sum_b: torch.Tensor,
    sum_aa: torch.Tensor,
    sum_bb: torch.Tensor,
    sum_ab: torch.Tensor,
    n: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """E[a] and its standard error by the regression estimator with control variate b, E[b] = 1 ([T] each).

    b = ‖ε‖²/d of the drawn noise has the known mean 1 and follows ‖ε̂‖²/d closely where ε̂ ≈ ε, so the fitted line
    of a on b, read at b = 1, has several times less variance than the plain mean of a (Owen, "Monte Carlo theory,
    methods and examples", section 8.9). Its error is the fit's residual spread at b = 1, σ²(1/n + (b̄ - 1)²/S_bb).
    """
    mean_a, mean_b = sum_a / n, sum_b / n
    s_bb = (sum_bb - n * mean_b**2).clamp(min=1e-300)
    s_ab = sum_ab - n * mean_a * mean_b
    s_aa = (sum_aa - n * mean_a**2).clamp(min=0)
    slope = s_ab / s_bb
    estimate = mean_a - slope * (mean_b - 1)
    residual_variance = (s_aa - s_ab**2 / s_bb).clamp(min=0) / (n - 2)
    return estimate, (residual_variance * (1 / n + (mean_b - 1) ** 2 / s_bb)).sqrt()


def calibrate_pipeline(
    pipe: Any, images: torch.Tensor, batch_size: int = 256, seed: int = 0, progress: bool = True
) -> GammaEstimate:
    """Estimate Γ for `pipe` (an `HFDDPMPipeline` with a posterior scheduler) from `images` ([M, C, H, W] in
    [-1, 1]) and store it in its scheduler config as `analytic_gamma`, so that saving the pipeline keeps it.
    The scheduler is rebuilt from its config (`from_config`), which validates the new key."""
    scheduler = pipe.scheduler
    if not isinstance(scheduler, PosteriorSchedulerBase):
        raise ValueError(
            f"{type(scheduler).__name__} has no analytic variance; calibrate a pipeline whose scheduler is "
            "DDPMPosteriorScheduler or DDIMPosteriorScheduler."
        )
    was_training = pipe.unet.training
    pipe.unet.eval()
    try:
        estimate = estimate_gamma(
            pipe.unet,
            scheduler.diffusion,
            images,
            scheduler.config.prediction_type,
            batch_size,
            torch.Generator().manual_seed(seed),
            progress,
        )
    finally:
        pipe.unet.train(was_training)
    gamma = [float(f"{value:.{SAVED_DIGITS}g}") for value in estimate.gamma.tolist()]
    pipe.scheduler = type(scheduler).from_config(scheduler.config, analytic_gamma=gamma)
    return estimate


def _write_calibrated(pipe: Any, model: str, output: str | None) -> Path:
    """Write the calibrated pipeline: into `model`'s scheduler config in place (atomically), or as a whole new
    pipeline folder `output` (saved to a temporary sibling that is renamed to `output` once complete)."""
    if output is None:
        path = Path(model) / "scheduler" / "scheduler_config.json"
        atomic_write(path, pipe.scheduler.to_json_string())
        return path
    target = Path(output)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        pipe.save_pretrained(tmp)
        if target.is_dir():
            target.rmdir()  # empty (checked before calibrating)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject bad arguments (`parser.error`: usage, message, exit status 2) before any loading or computing."""
    if args.num_samples < MIN_SAMPLES:
        parser.error(f"--num_samples must be >= {MIN_SAMPLES} (images per timestep), got {args.num_samples}.")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}.")
    model = Path(args.model)
    local = model.exists() or args.model.startswith((".", "/", "~")) or args.model.count("/") > 1
    if local and not (model / "model_index.json").is_file():
        parser.error(f"--model {args.model}: no pipeline folder there (no model_index.json).")
    if not local and args.output is None:
        parser.error(
            f"--model {args.model}: no such folder, and a Hub repo id cannot be updated in place (pass --output DIR "
            "to write a calibrated copy)."
        )
    if args.output is not None:
        output = Path(args.output)
        if output.exists() and (not output.is_dir() or any(output.iterdir())):
            parser.error(
                f"--output {args.output} exists and is not an empty folder; choose a new folder, or omit --output to "
                "update --model in place."
            )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hf_ddpm.calibrate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a pipeline folder (updated in place) or Hub repo id")
    from .evaluator import add_dataset_arguments

    add_dataset_arguments(parser)
    parser.add_argument("--num_samples", type=int, required=True, help=f"images per timestep (>= {MIN_SAMPLES})")
    parser.add_argument("--output", default=None, help="write a calibrated copy of the pipeline here instead")
    parser.add_argument("--batch_size", type=int, default=256, help="model inputs per forward pass (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: 0)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    _check_args(parser, args)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the CLI: calibrate, write, and print one JSON line with the Monte Carlo error; returns it as a dict."""
    args = parse_args(argv)
    started = time.perf_counter()
    from diffusers import DiffusionPipeline

    import hf_ddpm  # noqa: F401 - registers our classes with diffusers

    from .evaluator import real_images

    pipe = DiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.unet.config
    images = real_images(
        args.dataset, config.sample_size, config.in_channels, args.num_samples, args.image_column, args.split
    )
    if len(images) < args.num_samples:
        raise ValueError(
            f"--dataset {args.dataset or 'digits'} has {len(images)} readable image(s), fewer than --num_samples "
            f"{args.num_samples}."
        )
    estimate = calibrate_pipeline(pipe, images, args.batch_size, args.seed, progress=not args.no_progress)
    written = _write_calibrated(pipe, args.model, args.output)
    result = {"model": args.model, "written": str(written), **estimate.summary()}
    result["seconds"] = round(time.perf_counter() - started, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
