"""hf_ddpm.validation.check_int: the one integer check of the schedulers and the pipeline."""

import numpy as np
import pytest

from hf_ddpm import DDIMPosteriorScheduler, DDPMPosteriorScheduler
from hf_ddpm.validation import check_int


@pytest.mark.parametrize("value", [3, np.int64(3), np.int32(1000)])
def test_integers_in_range_pass(value):
    assert check_int("n", value, 1, 1000) == int(value) and type(check_int("n", value, 1)) is int


@pytest.mark.parametrize(
    ("value", "maximum", "message"),
    [
        (0, 10, r"n must be an integer in \[1, 10\] \(the note\), got 0\."),
        (11, 10, r"n must be an integer in \[1, 10\] \(the note\), got 11\."),
        (2.0, None, r"n must be an integer >= 1, got 2\.0\."),
        (True, None, r"n must be an integer >= 1, got True\."),
        (np.bool_(True), None, r"n must be an integer >= 1, got .*True"),
        ("3", None, r"n must be an integer >= 1, got '3'\."),
    ],
)
def test_anything_else_is_named(value, maximum, message):
    with pytest.raises(ValueError, match=message):
        check_int("n", value, 1, maximum, "(the note)" if maximum else "")


@pytest.mark.parametrize("cls", [DDPMPosteriorScheduler, DDIMPosteriorScheduler])
def test_schedulers_refuse_a_boolean_step_count(cls):
    with pytest.raises(ValueError, match=r"num_inference_steps must be an integer in \[1, 1000\]"):
        cls().set_timesteps(True)
