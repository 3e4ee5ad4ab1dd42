"""What a run measures as it trains, continuing a resumed checkpoint's measurements: time, throughput, loss,
skipped images and the evaluation history. A checkpoint stores `RunProgress.as_dict()`; the card reads `metrics`."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from ..data import SkippedImages
from .model_card import TrainingMetrics

LOSS_WINDOW = 50  # steps averaged for the reported loss


class RunProgress:
    """The run's running measurements; `prior` is what the resumed checkpoint had measured ({} for a new run).

    Attributes:
        losses: the last `LOSS_WINDOW` finite step losses.
        skipped: unreadable images met so far.
        eval_history: one dict per evaluation, starting with the resumed checkpoint's.
        eval_loss: the fixed-batch loss of the saved weights at the last evaluation (None before one).
        overhead: seconds spent sampling, evaluating and saving (excluded from throughput).
        images_seen: training images over all processes in this run.
    """

    def __init__(self, prior: dict[str, Any]):
        self.prior = prior
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self.skipped = SkippedImages()
        self.eval_history: list[dict[str, Any]] = list(prior.get("eval_history", []))
        self.eval_loss: float | None = None
        self.overhead = 0.0
        self.images_seen = 0
        self.start_time = time.perf_counter()

    def restart_clock(self) -> None:
        """Start the training clock now (set-up before the first step is not training time)."""
        self.start_time = time.perf_counter()

    def mean_loss(self) -> float | None:
        """The mean of the loss window (None while it is empty)."""
        return sum(self.losses) / len(self.losses) if self.losses else None

    def as_dict(self) -> dict[str, Any]:
        """Running measurements of the whole run, including what a resumed checkpoint had measured before."""
        prior = self.prior
        elapsed = time.perf_counter() - self.start_time
        last_loss = self.mean_loss() if self.losses else prior.get("final_loss")
        return {
            "train_seconds": prior.get("train_seconds", 0.0) + elapsed,
            "compute_seconds": prior.get("compute_seconds", 0.0) + elapsed - self.overhead,
            "images_seen": prior.get("images_seen", 0) + self.images_seen,
            "final_loss": last_loss,
            "skipped_images": prior.get("skipped_images", 0) + self.skipped.count,
            "eval_loss": self.eval_loss if self.eval_loss is not None else prior.get("eval_loss"),
            "eval_history": list(self.eval_history),  # starts with the resumed checkpoint's
        }

    def metrics(self, global_step: int, num_parameters: int) -> TrainingMetrics:
        """The measurements at `global_step` as the card and `training_metrics.json` report them."""
        p = self.as_dict()
        return TrainingMetrics(
            global_step=global_step,
            final_loss=p["final_loss"],
            train_seconds=p["train_seconds"],
            images_per_second=p["images_seen"] / max(p["compute_seconds"], 1e-9),
            num_parameters=num_parameters,
            skipped_images=p["skipped_images"],
            eval_loss=p["eval_loss"],
            eval_history=p["eval_history"],
        )
