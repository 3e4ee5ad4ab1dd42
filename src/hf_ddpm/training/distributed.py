"""Checks that the processes of a multi-process run (`accelerate launch`) agree: each has data, all end alike."""

from __future__ import annotations

import logging

import datasets
import torch
from accelerate import Accelerator
from datasets.distributed import split_dataset_by_node

logger = logging.getLogger(__name__)


def check_stream_parts(raw: datasets.IterableDataset, accelerator: Accelerator) -> None:
    """Raise the same ValueError on every process when any process's part of the stream has no rows (fewer rows or
    shards than processes): that process would fail at its first batch while the others train on.

    It peeks at the unshuffled split, which reads one row instead of filling a shuffle buffer; the shuffle changes
    which rows a process gets, not how many, unless some shards are empty (StreamBatches still stops on an empty part).
    """
    rank, world_size = accelerator.process_index, accelerator.num_processes
    has_rows = next(iter(split_dataset_by_node(raw, rank=rank, world_size=world_size)), None) is not None
    found = accelerator.gather(torch.tensor([int(has_rows)], device=accelerator.device)).tolist()
    empty = [index for index, rows in enumerate(found) if not rows]
    if empty:
        which = f"process {empty[0]}" if len(empty) == 1 else f"processes {empty}"
        raise ValueError(
            f"{which} of {len(found)} got an empty part of the stream: the dataset has fewer rows (or shards) than "
            "there are processes. Launch fewer processes, or train without --streaming."
        )


@torch.no_grad()
def check_processes_agree(accelerator: Accelerator, tensors: list[torch.Tensor], what: str = "weights") -> None:
    """Every process must end with the same `tensors` (weights, and EMA): a float64 checksum of each process' is
    compared, and a RuntimeError lists them when they differ. One process: nothing to compare."""
    if accelerator.num_processes == 1:
        return
    flat = torch.cat([p.detach().double().flatten() for p in tensors])
    positions = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64) % 1009
    checksum = torch.stack([flat.sum(), (flat * flat).sum(), (flat * positions).sum()])
    gathered = accelerator.gather(checksum[None]).cpu()
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError(f"the processes ended with different weights (checksums per process: {gathered})")
    logger.info(
        "all %d processes hold the same %s (checksum %s)",
        accelerator.num_processes,
        what,
        [f"{v:.12g}" for v in gathered[0].tolist()],
    )
