"""The training DataLoader: a reproducible shuffle per epoch, and a fixed evaluation batch."""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..data import collate_fn


class EpochShuffleSampler(Sampler[int]):
    """A permutation of `range(num_rows)` that depends only on `(seed, epoch)`.

    Resuming relies on it: the resumed run rebuilds the interrupted epoch's order and skips the batches already
    seen. It has no `generator` attribute on purpose: accelerate would then re-seed it from the global RNG.
    Under multi-process training accelerate shards its batches, and every rank computes the same permutation.
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation (accelerate's DataLoaderShard also calls this)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(np.random.default_rng((self.seed, self.epoch)).permutation(self.num_rows).tolist())

    def __len__(self) -> int:
        return self.num_rows


def build_dataloader(dataset: datasets.Dataset, batch_size: int, num_workers: int, seed: int) -> DataLoader:
    """A DataLoader over a prepared dataset. Its own generator keeps the global torch RNG (which draws the noise
    and the timesteps, and which checkpoints restore) untouched when an epoch's iterator starts."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed),
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
    )


def eval_batch(
    dataset: datasets.Dataset, num_timesteps: int, seed: int, size: int = 64
) -> dict[str, torch.Tensor] | None:
    """A fixed batch for `--eval_steps`: the first `size` readable rows (epoch-0 augmentation), noise from a
    seeded generator and timesteps spread evenly over [0, T), so successive evaluations differ only by the model.
    None when none of those rows can be read."""
    rows = [dataset[i] for i in range(min(size, len(dataset)))]
    x0 = collate_fn(rows)["pixel_values"]
    if x0.shape[0] == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.linspace(0, num_timesteps - 1, x0.shape[0]).round().long()
    return {"x0": x0, "noise": noise, "t": t}
