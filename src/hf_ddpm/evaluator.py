"""The `Evaluator`: bits/dim of real images and FID of generated samples, for one pipeline after another.

`python -m hf_ddpm.evaluate` runs it once; training's `--eval_steps` runs it with a small budget, each process on
its share of the samples (`Shard`). What it measures and how is one `EvalConfig`.
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .evaluation import BitsPerDim, dataset_bits_per_dim
from .fid import FeatureStats, make_extractor, real_stats
from .schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler

METRICS = ("bpd", "fid")
SCHEDULERS = {"ddpm": DDPMPosteriorScheduler, "ddim": DDIMPosteriorScheduler}
BPD_MODES = ("exact", "fast")


@dataclass(frozen=True)
class EvalConfig:
    """What an `Evaluator` measures and how; a bad value raises a ValueError naming it and what is allowed.

    Args:
        metrics: some of `METRICS`.
        num_samples: the budget over all processes: real images for bits/dim and samples for FID (>= 2).
        scheduler, steps, eta: the sampler for FID (`SCHEDULERS`).
        features: FID features (`hf_ddpm.fid.make_extractor`).
        dataset_key: names the real images in the cache key of their FID statistics.
        bpd_mode: "fast" (a stratified estimate of Σ L_t, with its standard error) or "exact" (every t).
        seed: of the samples and of fast mode's timesteps (a shard's process adds its index).
        batch_size: images per forward pass of the bits/dim bound.
    """

    metrics: Sequence[str] = METRICS
    num_samples: int = 256
    scheduler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    features: str = "digits"
    dataset_key: str = "digits"
    bpd_mode: str = "fast"
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(self.metrics))
        unknown = set(self.metrics) - set(METRICS)
        if unknown or not self.metrics:
            raise ValueError(
                f"Unknown metrics {sorted(unknown) or list(self.metrics)}; allowed: {', '.join(METRICS)}."
            )
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"Unknown scheduler {self.scheduler!r}; allowed: {', '.join(SCHEDULERS)}.")
        if self.num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 (FID needs a covariance), got {self.num_samples}.")
        if self.bpd_mode not in BPD_MODES:
            raise ValueError(f"Unknown bpd_mode {self.bpd_mode!r}; allowed: 'exact', 'fast'.")


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


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """The command-line flags that name the real images (`real_images`): --dataset, --image_column, --split."""
    parser.add_argument(
        "--dataset", default=None, help="Hub id, image folder or save_to_disk folder (default: digits)"
    )
    parser.add_argument("--image_column", default=None, help="the image column (default: found)")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")


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
def generate(
    pipe,
    num_images: int,
    scheduler: str | Callable[[Any], Any],
    steps: int,
    eta: float,
    seed: int,
    batch_size: int = 64,
):
    """`num_images` samples [N, C, H, W] in [0, 1] with the named sampler (`SCHEDULERS`), or the scheduler that
    `scheduler(config)` builds (e.g. `DPMSolverMultistepScheduler.from_config`), from the pipeline's config."""
    original = pipe.scheduler
    build = SCHEDULERS[scheduler].from_config if isinstance(scheduler, str) else scheduler
    pipe.scheduler = build(original.config)
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
        real: [N, C, H, W] in [-1, 1]: bits/dim is measured on the first `config.num_samples`, FID's real statistics
            on all N, computed once: in one process cached on disk under a key of `config.dataset_key` and a hash
            of `real`, in a shard by all its processes at the first call.
        config: what to measure and how (`EvalConfig`).
        shard: this process' part when several processes evaluate together (`Shard`); only process 0 gets the
            result, the others None.
        device: where the FID feature extractor runs (built once).

    The same instance serves the CLI (once) and training (at every `--eval_steps`).
    """

    def __init__(
        self,
        real: torch.Tensor,
        config: EvalConfig = EvalConfig(),
        *,
        shard: Shard | None = None,
        device: str | torch.device | None = None,
    ):
        if "fid" in config.metrics and len(real) < 2:
            raise ValueError(f"FID needs at least 2 real images, got {len(real)}.")
        self.real, self.config, self.shard = real, config, shard or Shard()
        self.extractor = make_extractor(config.features, device) if "fid" in config.metrics else None
        self._real_stats: FeatureStats | None = None
        self._calls = 0  # alike on every process: the first call of a shard also shares the real features

    def real_stats(self):
        """FID's statistics of all real images, computed once (in one process; a shard's processes share the work
        on their first call instead)."""
        if self._real_stats is None:
            digest = hashlib.sha256(self.real.float().contiguous().numpy().tobytes()).hexdigest()[:16]
            # The hash: a changed folder is not a cache hit.
            key = f"{self.config.dataset_key}#{len(self.real)}#{digest}"
            self._real_stats = real_stats(key, self.extractor, lambda: (self.real + 1) / 2)
        return self._real_stats

    @torch.no_grad()
    def __call__(self, pipe) -> dict[str, Any] | None:
        """Evaluate `pipe` (its U-Net as it is: put it in eval mode first); every process of the shard calls this.
        Returns the result on process 0 (None on the others): `bpd`, `bpd_stderr`, `bpd_images`, `fid`,
        `fid_samples`, ..., and `seconds`, the wall time of the whole call."""
        started = time.perf_counter()
        config, shard = self.config, self.shard
        local: dict[str, Any] = {}
        if "bpd" in config.metrics:
            local["bpd"] = self._bits_per_dim(pipe)
        if "fid" in config.metrics:
            count = len(range(config.num_samples)[shard.part(config.num_samples)])
            fake = generate(pipe, count, config.scheduler, config.steps, config.eta, config.seed + shard.index)
            local["features"] = self.extractor.extract(fake) if count else None
            if config.features == "digits":
                local["probs"] = self.extractor.predict_proba(fake) if count else torch.empty(0, 10)
            if shard.count > 1 and self._calls == 0:
                real = self.real[shard.part(len(self.real))]
                local["real_features"] = self.extractor.extract((real + 1) / 2) if len(real) else None
        self._calls += 1
        parts = shard.gather(local)
        if shard.index != 0:
            return None
        result: dict[str, Any] = {"num_samples": config.num_samples}
        if "bpd" in config.metrics:
            bpd = BitsPerDim(
                **{k: torch.cat([p["bpd"][k] for p in parts]) for k in ("total", "prior", "decoder", "stderr")},
                terms=torch.empty(0),
            )
            result.update(
                bpd=bpd.mean, bpd_stderr=bpd.mean_stderr, bpd_mode=config.bpd_mode, bpd_images=len(bpd.total)
            )
            result["bpd_terms"] = {"prior": bpd.prior.mean().item(), "decoder": bpd.decoder.mean().item()}
        if "fid" in config.metrics:
            features = torch.cat([p["features"] for p in parts if p["features"] is not None])
            fake_stats = FeatureStats.from_features(features)
            if "real_features" in parts[0]:
                real = torch.cat([p["real_features"] for p in parts if p["real_features"] is not None])
                self._real_stats = FeatureStats.from_features(real)
            result.update(fid=self.real_stats().frechet_distance(fake_stats), fid_samples=len(features))
            result.update(features=config.features, dataset=config.dataset_key)
            result.update(scheduler=config.scheduler, steps=config.steps, eta=config.eta)
            if config.features == "digits":
                probs = torch.cat([p["probs"] for p in parts])
                result["digits"] = self.extractor.report_probabilities(probs)
        result["seconds"] = round(time.perf_counter() - started, 2)
        return result

    def _bits_per_dim(self, pipe) -> dict[str, torch.Tensor]:
        """This process' share of the per-image bound: {"total", "prior", "decoder", "stderr"}, each [n] on the CPU."""
        num_samples = self.config.num_samples
        real = self.real[:num_samples][self.shard.part(min(num_samples, len(self.real)))]
        if not len(real):
            return {k: torch.empty(0, dtype=torch.float64) for k in ("total", "prior", "decoder", "stderr")}
        scheduler_config = pipe.scheduler.config
        process = DDPMPosteriorScheduler.from_config(scheduler_config).diffusion
        unet = pipe.unet
        bpd = dataset_bits_per_dim(
            unet, process, real.to(unet.device, unet.dtype).float().split(self.config.batch_size),
            seed=self.config.seed + self.shard.index, prediction_type=scheduler_config.prediction_type,
            variance_type=scheduler_config.get("variance_type", "fixed_small"), mode=self.config.bpd_mode,
        )  # fmt: skip
        return {"total": bpd.total, "prior": bpd.prior, "decoder": bpd.decoder, "stderr": bpd.stderr}


def evaluate_pipeline(pipe, real: torch.Tensor, config: EvalConfig = EvalConfig()) -> dict[str, Any]:
    """Bits/dim of `real` ([N, C, H, W] in [-1, 1]) and FID of `config.num_samples` generated images against `real`,
    in one process (`Evaluator` once)."""
    return Evaluator(real, config)(pipe)
