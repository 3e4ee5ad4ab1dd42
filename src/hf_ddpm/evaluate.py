"""`python -m hf_ddpm.evaluate`: bits/dim and FID of a pipeline, printed as one JSON line.

    python -m hf_ddpm.evaluate --model outputs/digits-ddpm --metrics bpd,fid --num_samples 500 --scheduler ddim --steps 50

Training's `--eval_steps` calls `evaluate_pipeline` with a small budget.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from typing import Any

import torch

from .evaluation import dataset_bits_per_dim
from .schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler

METRICS = ("bpd", "fid")
SCHEDULERS = {"ddpm": DDPMPosteriorScheduler, "ddim": DDIMPosteriorScheduler}


def make_extractor(features: str):
    """'digits', 'inception' or 'dinov2[:MODEL_ID_OR_PATH]' -> a `hf_ddpm.fid` feature extractor."""
    from . import fid

    if features == "digits":
        return fid.DigitsClassifierExtractor()
    if features == "inception":
        return fid.InceptionExtractor()
    if features.startswith("dinov2"):
        _, _, model = features.partition(":")
        return fid.DinoV2Extractor(model or "facebook/dinov2-base")
    raise ValueError(f"Unknown features {features!r}; allowed: 'digits', 'inception', 'dinov2[:MODEL_ID_OR_PATH]'.")


def real_images(
    dataset_name: str | None,
    resolution: int,
    channels: int,
    num_images: int,
    image_column: str | None = None,
    split: str = "train",
) -> torch.Tensor:
    """The first `num_images` images of a dataset as the model sees them: [N, C, R, R] in [-1, 1]."""
    from .data import collate_fn, load_image_dataset, prepare_dataset

    ds = load_image_dataset(dataset_name, image_column=image_column, split=split)
    ds = prepare_dataset(ds, image_column, resolution, center_crop=True, random_flip=False, channels=channels)
    loader = torch.utils.data.DataLoader(ds, batch_size=256, collate_fn=collate_fn)
    batches, count = [], 0
    for batch in loader:
        batches.append(batch["pixel_values"])
        count += len(batches[-1])
        if count >= num_images:
            break
    return torch.cat(batches)[:num_images]


@torch.no_grad()
def generate(pipe, num_images: int, scheduler: str, steps: int, eta: float, seed: int, batch_size: int = 64):
    """`num_images` samples [N, C, H, W] in [0, 1] with the named sampler, built from the pipeline's config."""
    original = pipe.scheduler
    pipe.scheduler = SCHEDULERS[scheduler].from_config(original.config)
    try:
        generator = torch.Generator(device="cpu").manual_seed(seed)
        images = [
            pipe(batch_size=min(batch_size, num_images - start), num_inference_steps=steps, eta=eta,
                 generator=generator, output_type="pt").images.float().cpu()
            for start in range(0, num_images, batch_size)
        ]  # fmt: skip
    finally:
        pipe.scheduler = original
    return torch.cat(images)


def evaluate_pipeline(
    pipe,
    real: torch.Tensor,
    metrics: Sequence[str] = METRICS,
    num_samples: int = 256,
    scheduler: str = "ddim",
    steps: int = 50,
    eta: float = 0.0,
    features: str = "digits",
    dataset_key: str = "digits",
    bpd_mode: str = "fast",
    seed: int = 0,
) -> dict[str, Any]:
    """Bits/dim of `real` ([N, C, H, W] in [-1, 1]) and FID of `num_samples` generated images against `real`."""
    unknown = set(metrics) - set(METRICS)
    if unknown or not metrics:
        raise ValueError(f"Unknown metrics {sorted(unknown) or metrics}; allowed: {', '.join(METRICS)}.")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {scheduler!r}; allowed: {', '.join(SCHEDULERS)}.")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (FID needs a covariance), got {num_samples}.")
    result: dict[str, Any] = {"num_samples": num_samples}
    started = time.perf_counter()
    if "bpd" in metrics:
        config = pipe.scheduler.config
        process = DDPMPosteriorScheduler.from_config(config).diffusion
        variance_type = config.get("variance_type", "fixed_small")
        unet = pipe.unet
        bpd = dataset_bits_per_dim(
            unet, process, real[:num_samples].to(unet.device, unet.dtype).float().split(64), seed=seed,
            prediction_type=config.prediction_type, variance_type=variance_type, mode=bpd_mode,
        )  # fmt: skip
        result.update(bpd=bpd.mean, bpd_stderr=bpd.mean_stderr, bpd_mode=bpd_mode)
        result["bpd_terms"] = {"prior": bpd.prior.mean().item(), "decoder": bpd.decoder.mean().item()}
    if "fid" in metrics:
        from .fid import fid_from_images, real_stats

        extractor = make_extractor(features)
        fake = generate(pipe, num_samples, scheduler, steps, eta, seed)
        stats = real_stats(f"{dataset_key}#{len(real)}", extractor, lambda: (real + 1) / 2)  # cached on disk
        result.update(fid=fid_from_images(stats, fake, extractor), features=features, dataset=dataset_key)
        result.update(scheduler=scheduler, steps=steps, eta=eta)
        if features == "digits":
            result["digits"] = extractor.report(fake)
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hf_ddpm.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a pipeline folder or Hub repo id")
    parser.add_argument(
        "--dataset", default=None, help="Hub id, image folder or save_to_disk folder (default: digits)"
    )
    parser.add_argument("--image_column", default=None, help="the image column (default: found)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--metrics", default="bpd,fid", help="comma-separated: bpd, fid (default: bpd,fid)")
    parser.add_argument("--num_samples", type=int, default=256, help="real images for bpd and FID (default: 256)")
    parser.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS), help="sampler (default: ddim)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0)")
    parser.add_argument("--features", default=None, help="digits | inception | dinov2[:ID] (default: digits for the "
                        "built-in digits, else inception)")  # fmt: skip
    parser.add_argument("--bpd_mode", default="fast", choices=("exact", "fast"), help="(default: fast)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the CLI; prints one JSON line and returns it as a dict."""
    args = parse_args(argv)
    from diffusers import DiffusionPipeline

    import hf_ddpm  # noqa: F401 - registers our classes with diffusers

    pipe = DiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size
    real = real_images(
        args.dataset, size, pipe.unet.config.in_channels, args.num_samples, args.image_column, args.split
    )
    features = args.features or ("digits" if args.dataset is None else "inception")
    result = evaluate_pipeline(
        pipe, real, [m.strip() for m in args.metrics.split(",") if m.strip()], len(real), args.scheduler,
        args.steps, args.eta, features, f"{args.dataset or 'digits'}:{args.split}@{size}", args.bpd_mode, args.seed,
    )  # fmt: skip
    result = {"model": str(args.model), **result}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
