"""The training DataLoader: a reproducible shuffle per epoch (or a stream's batches with their position), and a
fixed evaluation batch."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..data import collate_fn, set_epoch

logger = logging.getLogger(__name__)


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


class StreamBatches:
    """Batches of this process's part of a stream (`data.shard_stream` + `prepare_dataset`), epoch after epoch,
    and the position reached: the epoch and how many of its batches were handed out.

    A stream has no length, so the loop asks for epochs until it has made its steps; each process runs through its
    own part at its own pace (parts may differ by a shard) and the processes stay in step because every optimizer
    step takes the same number of batches on each. Not passed to `accelerator.prepare`, which would shard the stream
    a second time (and dispatch it from one process).

    Resuming (`load_state_dict` with the position a checkpoint stored for this process) re-reads the interrupted
    epoch from its start and discards the batches already trained on. That costs decoding them again, but it works
    for any number of DataLoader workers, and it repeats the exact batches, augmentation included, so a resumed run
    continues bit for bit (`IterableDataset.state_dict` would need a stateful DataLoader to cover workers).
    """

    def __init__(self, dataset: datasets.IterableDataset, batch_size: int, num_workers: int, seed: int):
        self.dataset = dataset
        # Its own generator, as in `build_dataloader`: starting an epoch leaves the global torch RNG untouched.
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            collate_fn=collate_fn,
            num_workers=num_workers,
            generator=torch.Generator().manual_seed(seed),
        )
        self.epoch, self.batches_read = 0, 0

    def state_dict(self) -> dict[str, int]:
        """The position: the current epoch and the batches of it handed out so far."""
        return {"epoch": self.epoch, "batches": self.batches_read}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a stored position (the next `epoch_batches(epoch)` skips the batches it counts)."""
        self.epoch, self.batches_read = int(state["epoch"]), int(state["batches"])

    def epochs(self) -> Iterator[int]:
        """The epochs from the current one on, without end: the caller stops at its step count."""
        return itertools.count(self.epoch)

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The batches of `epoch` not yet handed out; in the epoch of a loaded position, those after it.

        Raises:
            RuntimeError: this process's part of the stream is empty, or shorter than the loaded position (the data
                changed since the checkpoint).
        """
        skip = self.batches_read if epoch == self.epoch else 0
        self.epoch, self.batches_read = epoch, 0
        if skip:
            logger.info("resuming the stream in epoch %d: re-reading and discarding %d batches", epoch, skip)
        set_epoch(self.dataset, epoch)
        for batch in self.loader:
            self.batches_read += 1
            if self.batches_read > skip:
                yield batch
        if self.batches_read == 0:
            raise RuntimeError(
                f"this process's part of the stream is empty (epoch {epoch}): the dataset has fewer rows (or shards) "
                "than there are processes"
            )
        if self.batches_read < skip:
            raise RuntimeError(
                f"the stream's epoch {epoch} has {self.batches_read} batches here, but the checkpoint had read {skip}: "
                "the dataset changed since the checkpoint was written"
            )


def eval_batch(
    dataset: datasets.Dataset | datasets.IterableDataset, num_timesteps: int, seed: int, size: int = 64
) -> dict[str, torch.Tensor] | None:
    """A fixed batch for `--eval_steps`: the first `size` readable rows (epoch-0 augmentation; of a stream, the
    first of its epoch-0 order), noise from a seeded generator and timesteps spread evenly over [0, T), so
    successive evaluations differ only by the model. None when none of those rows can be read."""
    if isinstance(dataset, datasets.IterableDataset):
        rows = list(dataset.take(size))
    else:
        rows = [dataset[i] for i in range(min(size, len(dataset)))]
    x0 = collate_fn(rows)["pixel_values"]
    if x0.shape[0] == 0:
        return None
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.linspace(0, num_timesteps - 1, x0.shape[0]).round().long()
    return {"x0": x0, "noise": noise, "t": t}
