"""The model card (README.md) of a trained pipeline: Hub metadata, how to load it, the recipe, measured metrics."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic_files import atomic_write

CARD_TAGS = ("diffusers", "unconditional-image-generation", "hf-ddpm", "ddpm")


@dataclass
class TrainingMetrics:
    """What the run measured, for the card and `training_metrics.json`."""

    global_step: int
    final_loss: float | None  # mean training loss over the last steps
    train_seconds: float  # wall time of the training loop (summed over resumed runs)
    images_per_second: float  # training throughput over all processes, sampling/eval/saving excluded
    num_parameters: int
    skipped_images: int = 0
    eval_loss: float | None = None  # loss of the saved weights on the fixed evaluation batch
    # {"step", "eval/loss_ema", "eval/bpd", "eval/fid", "eval/seconds", ...} per evaluation (`--eval_steps`)
    eval_history: list[dict[str, float]] = field(default_factory=list)


def _dataset_text(args: argparse.Namespace) -> str:
    if args.train_data_dir:
        return f"the image folder `{os.path.basename(os.path.normpath(args.train_data_dir))}`"
    if args.dataset_name is None:
        return "the 1,797 handwritten digits of scikit-learn (8x8, upscaled)"
    if os.path.exists(os.path.expanduser(args.dataset_name)):
        return f"the local dataset `{os.path.basename(os.path.normpath(args.dataset_name))}`"
    return f"[{args.dataset_name}](https://huggingface.co/datasets/{args.dataset_name})"


def _hub_dataset(args: argparse.Namespace) -> str | None:
    name = args.dataset_name
    if name is None or args.train_data_dir or os.path.exists(os.path.expanduser(name)):
        return None
    return name


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def _eval_rows(args: argparse.Namespace, metrics: TrainingMetrics) -> list[tuple[str, str]]:
    """Bits/dim and FID of the last evaluation that measured them, and what the evaluations cost."""
    from .periodic_eval import eval_features

    history = metrics.eval_history
    rows = []
    last = next((e for e in reversed(history) if "eval/bpd" in e or "eval/fid" in e), None)
    weights = "EMA" if args.use_ema else "raw"
    if last is not None and "eval/bpd" in last:
        mode = getattr(args, "eval_bpd_mode", "fast")
        label = f"Bits/dim ({mode} variational bound, {weights} weights, first {last['eval/bpd_images']:.0f} images)"
        rows.append((label, f"{last['eval/bpd']:.4f} ± {last['eval/bpd_stderr']:.2g} (step {last['step']:,})"))
    if last is not None and "eval/fid" in last:
        label = (
            f"FID ({eval_features(args)} features, {last['eval/fid_samples']:.0f} DDIM-{args.eval_sample_steps} "
            f"samples of the {weights} weights vs the first {last.get('eval/bpd_images', args.eval_num_samples):.0f} images)"
        )
        rows.append((label, f"{last['eval/fid']:.4g} (step {last['step']:,})"))
    seconds = [e["eval/seconds"] for e in history if "eval/seconds" in e]
    if seconds:
        rows.append(("Evaluation time", f"{sum(seconds):.0f} s over {len(seconds)} evaluations"))
    return rows


def render_model_card(
    repo_id: str, args: argparse.Namespace, metrics: TrainingMetrics, sample_grid: str | None, num_processes: int
) -> str:
    """README.md text for the pipeline at `repo_id` (a Hub id or a local path)."""
    front = ["---", "license: apache-2.0", "library_name: diffusers", "pipeline_tag: unconditional-image-generation"]
    front += ["tags:"] + [f"- {tag}" for tag in CARD_TAGS]
    if (dataset := _hub_dataset(args)) is not None:
        front += ["datasets:", f"- {dataset}"]
    front.append("---")
    ema = f"EMA (max decay {args.ema_max_decay}, warmup 1 - (1 + step/{args.ema_inv_gamma})^-{args.ema_power})"
    batch = args.train_batch_size * args.gradient_accumulation_steps * num_processes
    recipe = [
        ("Preset", f"`{args.preset}`"),
        (
            "U-Net",
            f"DDPMUNet `{args.unet_preset}`{' with ' + json.dumps(args.unet_overrides) if args.unet_overrides else ''}, "
            f"{metrics.num_parameters:,} parameters, dropout {args.dropout}",
        ),  # fmt: skip
        ("Data", f"{_dataset_text(args)}, {args.resolution}x{args.resolution}, flips: {args.random_flip}"),
        ("Diffusion", f"T = {args.ddpm_num_steps}, `{args.ddpm_beta_schedule}` β schedule"),
        ("Prediction / variance", f"`{args.prediction_type}` / `{args.variance_type}`"),
        ("Loss", f"`{args.loss_type}`" + (f", min-SNR-γ = {args.snr_gamma}" if args.snr_gamma else "")),
        (
            "Optimizer",
            f"AdamW, lr {args.learning_rate:g} (`{args.lr_scheduler}`, {args.lr_warmup_steps} warmup steps), "
            f"β = ({args.adam_beta1}, {args.adam_beta2}), weight decay {args.adam_weight_decay:g}, "
            f"grad clip {args.max_grad_norm:g}",
        ),
        (
            "Batch",
            f"{batch} ({args.train_batch_size} x {args.gradient_accumulation_steps} accumulation x "
            f"{num_processes} processes)",
        ),  # fmt: skip
        ("Weights", ema if args.use_ema else "raw (no EMA)"),
        ("Mixed precision", args.mixed_precision),
        ("Seed", str(args.seed)),
    ]
    measured = [
        ("Optimizer steps", f"{metrics.global_step:,}"),
        ("Final training loss", _fmt(metrics.final_loss)),
        ("Evaluation loss (fixed batch)", _fmt(metrics.eval_loss)),
        *_eval_rows(args, metrics),
        ("Training time", f"{metrics.train_seconds:.0f} s"),
        ("Throughput", f"{metrics.images_per_second:.1f} images/s"),
        ("Unreadable images skipped", str(metrics.skipped_images)),
    ]
    lines = front + ["", f"# {Path(repo_id).name}", ""]
    lines += [
        f"A denoising diffusion probabilistic model ([Ho et al. 2020](https://arxiv.org/abs/2006.11239)) trained "
        f"with `hf_ddpm` (DDPM and DDIM as diffusers parts) on {_dataset_text(args)}.",
        "",
    ]
    if sample_grid is not None:
        lines += [f"![DDIM samples ({args.sample_steps} steps)]({sample_grid})", ""]
    lines += [
        "## Usage",
        "",
        "```python",
        "import hf_ddpm  # registers the hf_ddpm pipeline classes with diffusers",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{repo_id}")',
        "images = pipe(batch_size=16, num_inference_steps=50).images",
        "```",
        "",
        "## Training recipe",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in recipe],
        "",
        "## Metrics (measured by the training run)",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in measured],
        "",
    ]
    return "\n".join(lines)


def write_model_card(output_dir: str | os.PathLike, text: str) -> Path:
    """Write README.md into `output_dir` atomically."""
    path = Path(output_dir) / "README.md"
    atomic_write(path, text)
    return path
