"""Subnormal floats flushed to zero on the CPU while training.

Adam's second moments of weights whose gradients are tiny (grad² of 1e-20 is 1e-40) sink below float32's smallest
normal number, 1.2e-38, where x86 arithmetic on them is many times slower. Flushing such values to zero changes
nothing above that range; on the digits recipe it raised throughput by ~8% once they appear (a few hundred steps
in, see benchmarks/bench_training.py). GPUs are unaffected: the setting is the CPU's floating-point mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["flushes_denormals", "flushing_denormals"]


def flushes_denormals() -> bool:
    """Whether this thread's CPU math flushes subnormal floats to zero (torch has a setter only, so ask the CPU)."""
    return torch.tensor(1e-39, dtype=torch.float32).mul(1.0).item() == 0.0


@contextlib.contextmanager
def flushing_denormals(enabled: bool = True) -> Iterator[bool]:
    """Flush subnormals to zero inside the block when `enabled` and the CPU can (yields whether it does), then put
    the previous mode back. Threads started inside the block inherit the mode."""
    before = flushes_denormals()
    active = torch.set_flush_denormal(True) if enabled else before
    try:
        yield active
    finally:
        torch.set_flush_denormal(before)
