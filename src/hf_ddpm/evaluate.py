"""`python -m hf_ddpm.evaluate`: bits/dim and FID of a pipeline, printed as one JSON line.

    python -m hf_ddpm.evaluate --model outputs/digits-ddpm --metrics bpd,fid --num_samples 500 --scheduler ddim --steps 50

Training's `--eval_steps` runs the same `Evaluator` with a small budget, each process on its share of the samples.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .evaluation import BitsPerDim, dataset_bits_per_dim
from .schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler

METRICS = ("bpd", "fid")
SCHEDULERS = {"ddpm": DDPMPosteriorScheduler, "ddim": DDIMPosteriorScheduler}


def make_extractor(features: str, device: str | torch.device | None = None):
    """'digits', 'inception' or 'dinov2[:MODEL_ID_OR_PATH]' -> a `hf_ddpm.fid` feature extractor."""
    from . import fid

    check_features(features)
    if features == "digits":
        return fid.DigitsClassifierExtractor(device=device)
    if features == "inception":
        return fid.InceptionExtractor(device=device)
    _, _, model = features.partition(":")
    return fid.DinoV2Extractor(model or "facebook/dinov2-base", device=device)


def check_features(features: str) -> None:
    """Raise a ValueError unless `features` names an extractor `make_extractor` knows (nothing is loaded)."""
    if features not in ("digits", "inception") and features != "dinov2" and not features.startswith("dinov2:"):
        raise ValueError(
            f"Unknown features {features!r}; allowed: 'digits', 'inception', 'dinov2[:MODEL_ID_OR_PATH]'."
        )


def first_images(
    dataset, resolution: int, channels: int, num_images: int, image_column: str | None = None
) -> torch.Tensor:
    """The first `num_images` readable rows of a loaded dataset (`Dataset` or stream) as the model sees them,
    unaugmented (center crop, no flip): [N, C, R, R] in [-1, 1], N <= num_images."""
    from .data import collate_fn, prepare_dataset

    ds = prepare_dataset(dataset, image_column, resolution, center_crop=True, random_flip=False, channels=channels)
    loader = torch.utils.data.DataLoader(ds, batch_size=min(num_images, 256), collate_fn=collate_fn)
    batches, count = [], 0
    for batch in loader:
        if batch["pixel_values"].shape[0]:
            batches.append(batch["pixel_values"])
            count += len(batches[-1])
        if count >= num_images:
            break
    if not batches:
        raise ValueError("none of the dataset's images could be read")
    return torch.cat(batches)[:num_images]


def real_images(
    dataset_name: str | None,
    resolution: int,
    channels: int,
    num_images: int,
    image_column: str | None = None,
    split: str = "train",
) -> torch.Tensor:
    """The first `num_images` images of a dataset (Hub id, folder, saved dataset; None: the built-in digits) as the
    model sees them: [N, C, R, R] in [-1, 1] (`first_images`)."""
    from .data import load_image_dataset

    ds = load_image_dataset(dataset_name, image_column=image_column, split=split)
    return first_images(ds, resolution, channels, num_images, image_column)


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
    if not images:
        return torch.empty(0, pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    return torch.cat(images)


def _alone(obj: Any) -> list[Any]:
    return [obj]


@dataclass(frozen=True)
class Shard:
    """This process' part of an evaluation spread over `count` processes (e.g. under `accelerate launch`).

    Process `index` takes a contiguous share of the real images (bits/dim; FID's real features on the first call)
    and of the samples (FID), with seed `seed + index`; `gather(obj)` must return every process' `obj` in process order, on process 0 at least (e.g.
    `lambda obj: accelerate.utils.gather_object([obj])`). Every process calls it once per evaluation.
    """

    index: int = 0
    count: int = 1
    gather: Callable[[Any], list[Any]] = _alone

    def part(self, n: int) -> slice:
        """This process' contiguous share of range(n); shares differ in size by at most one."""
        return slice(n * self.index // self.count, n * (self.index + 1) // self.count)


class Evaluator:
    """Bits/dim of real images and FID of generated samples against them, for one pipeline after another.

    Args:
        real: [N, C, H, W] in [-1, 1]: bits/dim is measured on the first `num_samples`, FID's real statistics on all
            N, computed once: in one process cached on disk under a key of `dataset_key` and a hash of `real`, in a
            shard by all its processes at the first call.
        metrics: some of `METRICS`.
        num_samples: the budget over all processes: real images for bits/dim and samples for FID (>= 2).
        scheduler, steps, eta: the sampler for FID (`SCHEDULERS`).
        features: FID features (`make_extractor`), built once, on `device`.
        bpd_mode: "fast" (a stratified estimate of Σ L_t, with its standard error) or "exact" (every t).
        shard: this process' part when several processes evaluate together (`Shard`); only process 0 gets the
            result, the others None.

    The same instance serves the CLI (once) and training (at every `--eval_steps`).
    """

    def __init__(
        self,
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
        shard: Shard | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 64,
    ):
        unknown = set(metrics) - set(METRICS)
        if unknown or not metrics:
            raise ValueError(f"Unknown metrics {sorted(unknown) or list(metrics)}; allowed: {', '.join(METRICS)}.")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler {scheduler!r}; allowed: {', '.join(SCHEDULERS)}.")
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (FID needs a covariance), got {num_samples}.")
        if bpd_mode not in ("exact", "fast"):
            raise ValueError(f"Unknown bpd_mode {bpd_mode!r}; allowed: 'exact', 'fast'.")
        if "fid" in metrics and len(real) < 2:
            raise ValueError(f"FID needs at least 2 real images, got {len(real)}.")
        self.real, self.metrics, self.num_samples = real, tuple(metrics), num_samples
        self.scheduler, self.steps, self.eta, self.seed = scheduler, steps, eta, seed
        self.features, self.dataset_key, self.bpd_mode = features, dataset_key, bpd_mode
        self.shard, self.batch_size = shard or Shard(), batch_size
        self.extractor = make_extractor(features, device) if "fid" in self.metrics else None
        self._real_stats = None
        self._calls = 0  # alike on every process: the first call of a shard also shares the real features

    def real_stats(self):
        """FID's statistics of all real images, computed once (in one process; a shard's processes share the work
        on their first call instead)."""
        from .fid import real_stats

        if self._real_stats is None:
            digest = hashlib.sha256(self.real.float().contiguous().numpy().tobytes()).hexdigest()[:16]
            key = f"{self.dataset_key}#{len(self.real)}#{digest}"  # the hash: a changed folder is not a cache hit
            self._real_stats = real_stats(key, self.extractor, lambda: (self.real + 1) / 2)
        return self._real_stats

    @torch.no_grad()
    def __call__(self, pipe) -> dict[str, Any] | None:
        """Evaluate `pipe` (its U-Net as it is: put it in eval mode first); every process of the shard calls this.
        Returns the result on process 0 (None on the others): `bpd`, `bpd_stderr`, `bpd_images`, `fid`,
        `fid_samples`, ..., and `seconds`, the wall time of the whole call."""
        started = time.perf_counter()
        shard = self.shard
        local: dict[str, Any] = {}
        if "bpd" in self.metrics:
            local["bpd"] = self._bits_per_dim(pipe)
        if "fid" in self.metrics:
            count = len(range(self.num_samples)[shard.part(self.num_samples)])
            fake = generate(pipe, count, self.scheduler, self.steps, self.eta, self.seed + shard.index)
            local["features"] = self.extractor.extract(fake) if count else None
            if self.features == "digits":
                local["probs"] = self.extractor.predict_proba(fake) if count else torch.empty(0, 10)
            if shard.count > 1 and self._calls == 0:
                real = self.real[shard.part(len(self.real))]
                local["real_features"] = self.extractor.extract((real + 1) / 2) if len(real) else None
        self._calls += 1
        parts = shard.gather(local)
        if shard.index != 0:
            return None
        result: dict[str, Any] = {"num_samples": self.num_samples}
        if "bpd" in self.metrics:
            bpd = BitsPerDim(
                **{k: torch.cat([p["bpd"][k] for p in parts]) for k in ("total", "prior", "decoder", "stderr")},
                terms=torch.empty(0),
            )
            result.update(bpd=bpd.mean, bpd_stderr=bpd.mean_stderr, bpd_mode=self.bpd_mode, bpd_images=len(bpd.total))
            result["bpd_terms"] = {"prior": bpd.prior.mean().item(), "decoder": bpd.decoder.mean().item()}
        if "fid" in self.metrics:
            from .fid import FeatureStats

            features = torch.cat([p["features"] for p in parts if p["features"] is not None])
            fake_stats = FeatureStats.from_features(features)
            if "real_features" in parts[0]:
                real = torch.cat([p["real_features"] for p in parts if p["real_features"] is not None])
                self._real_stats = FeatureStats.from_features(real)
            result.update(fid=self.real_stats().frechet_distance(fake_stats), fid_samples=len(features))
            result.update(features=self.features, dataset=self.dataset_key)
            result.update(scheduler=self.scheduler, steps=self.steps, eta=self.eta)
            if self.features == "digits":
                probs = torch.cat([p["probs"] for p in parts])
                result["digits"] = self.extractor.report_probabilities(probs)
        result["seconds"] = round(time.perf_counter() - started, 2)
        return result

    def _bits_per_dim(self, pipe) -> dict[str, torch.Tensor]:
        """This process' share of the per-image bound: {"total", "prior", "decoder", "stderr"}, each [n] on the CPU."""
        real = self.real[: self.num_samples][self.shard.part(min(self.num_samples, len(self.real)))]
        if not len(real):
            return {k: torch.empty(0, dtype=torch.float64) for k in ("total", "prior", "decoder", "stderr")}
        config = pipe.scheduler.config
        process = DDPMPosteriorScheduler.from_config(config).diffusion
        unet = pipe.unet
        bpd = dataset_bits_per_dim(
            unet, process, real.to(unet.device, unet.dtype).float().split(self.batch_size),
            seed=self.seed + self.shard.index, prediction_type=config.prediction_type,
            variance_type=config.get("variance_type", "fixed_small"), mode=self.bpd_mode,
        )  # fmt: skip
        return {"total": bpd.total, "prior": bpd.prior, "decoder": bpd.decoder, "stderr": bpd.stderr}


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
    """Bits/dim of `real` ([N, C, H, W] in [-1, 1]) and FID of `num_samples` generated images against `real`, in
    one process (`Evaluator` once)."""
    return Evaluator(real, metrics, num_samples, scheduler, steps, eta, features, dataset_key, bpd_mode, seed)(pipe)


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
