"""Argument checks shared by the schedulers, the pipeline and the model: one wording for every integer setting."""

from __future__ import annotations

from typing import Any

import numpy as np


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None, bound_note: str = "") -> int:
    """Return `value` as an int, or raise a ValueError naming `name`, the value and the allowed range.

    Python and NumPy integers pass; booleans, floats and strings do not (a silently truncated 2.5 steps is a bug).
    `bound_note` says where `maximum` comes from, e.g. "(num_train_timesteps)".
    """
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        if value >= minimum and (maximum is None or value <= maximum):
            return int(value)
    allowed = f"an integer >= {minimum}" if maximum is None else f"an integer in [{minimum}, {maximum}]"
    note = f" {bound_note}" if bound_note else ""
    raise ValueError(f"{name} must be {allowed}{note}, got {value!r}.")
