"""The two ways a training run stops early, each with its exit code in `train.py` (2 and 1)."""

from __future__ import annotations


class TrainingInputError(ValueError):
    """Flags, data or output folder that cannot work, found before the first step (nothing has been written)."""


class TrainingDiverged(RuntimeError):
    """The loss was NaN/inf for `loop.MAX_NONFINITE_STEPS` optimizer steps in a row; the checkpoints are untouched."""
