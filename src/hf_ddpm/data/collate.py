"""Batches for the training loop: `collate_fn` stacks prepared rows into
`{"pixel_values": [B, C, H, W], "labels": [B], "num_skipped": int}`, and `SkippedImages` keeps the running count of
unreadable images.

The count travels in the batch because the collate function runs inside DataLoader worker processes, where a
module-level counter would be lost; `SkippedImages.update` accumulates it in the training loop's own process.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class SkippedImages:
    """Running count of unreadable images, for the training loop's logs.

    `collate_fn` reports each batch's drops in `batch["num_skipped"]` (it may run in a worker process, so it
    cannot update a counter here); call `update(batch)` in the loop's own process.
    """

    count: int = 0

    def update(self, batch: dict[str, Any]) -> int:
        """Add this batch's skipped rows; returns how many there were."""
        skipped = int(batch.get("num_skipped", 0))
        self.count += skipped
        return skipped


def collate_fn(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows from `prepare_dataset` -> `{"pixel_values": float32 [B, C, H, W], "labels": int64 [B] (if labelled),
    "num_skipped": int}`, dropping rows whose image could not be read. If every row was dropped, B = 0 and
    `pixel_values` has shape [0, 0, 0, 0]: the loop should skip such a batch."""
    kept = [row for row in examples if row.get("pixel_values") is not None]
    batch: dict[str, Any] = {"num_skipped": len(examples) - len(kept)}
    if kept:
        batch["pixel_values"] = torch.stack([row["pixel_values"] for row in kept]).contiguous()
    else:
        batch["pixel_values"] = torch.empty((0, 0, 0, 0), dtype=torch.float32)
    if examples and "label" in examples[0]:
        batch["labels"] = torch.tensor(
            [-1 if row["label"] is None else int(row["label"]) for row in kept], dtype=torch.long
        )
    return batch
