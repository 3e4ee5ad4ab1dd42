"""Scheduler input validation and properties over random valid configs.

Bad input is a ValueError whose message names the offending value and what is allowed. Over random valid configs
(hypothesis), every diffusion table and every step output is finite, the sampling timesteps are what was asked for,
SNR strictly decreases for every named schedule, and zero-terminal-SNR rescaling ends at ᾱ = 0.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_ddpm.diffusion import GaussianDiffusion
from hf_ddpm.schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler
from hf_ddpm.schedules import BETA_SCHEDULES, make_betas

SCHEDULERS = [DDPMPosteriorScheduler, DDIMPosteriorScheduler]
SHAPE = (2, 3, 4, 4)


# --- bad configs -----------------------------------------------------------------------------------------------------

BAD_CONFIGS = [
    pytest.param({"beta_schedule": "cubic"}, r"beta_schedule 'cubic'.*allowed: linear, scaled_linear", id="schedule"),
    pytest.param(
        {"prediction_type": "noise"}, r"prediction_type 'noise'.*allowed: epsilon, sample, v_prediction", id="pred"
    ),
    pytest.param(
        {"timestep_spacing": "uniform"}, r"timestep_spacing 'uniform'.*allowed: leading, trailing, linspace", id="sp"
    ),
    pytest.param(
        {"num_train_timesteps": 3, "trained_betas": [0.1, 0.0, 0.2]},
        r"'trained_betas' gives β\[1\] = 0\.0; every β must lie in \(0, 1\]",
        id="beta-zero",
    ),
    pytest.param(
        {"num_train_timesteps": 3, "trained_betas": [0.1, -0.2, 0.2]},
        r"β\[1\] = -0\.2; every β must lie in \(0, 1\]",
        id="beta-negative",
    ),
    pytest.param(
        {"num_train_timesteps": 3, "trained_betas": [0.1, 0.2, 1.5]},
        r"β\[2\] = 1\.5; every β must lie in \(0, 1\]",
        id="beta-above-one",
    ),
    pytest.param(
        {"num_train_timesteps": 4, "trained_betas": lambda t: 1.5},
        r"β\[0\] = 1\.5; every β must lie in \(0, 1\]",
        id="callable-1.5",
    ),
    pytest.param(
        {"num_train_timesteps": 3, "trained_betas": [0.1, 1.0, 0.2]},
        r"makes ᾱ_1 = 0 before the last step.*only the last ᾱ may be 0",
        id="beta-one-early",
    ),
    pytest.param(
        {"num_train_timesteps": 3, "trained_betas": [0.1, 0.2]},
        r"num_train_timesteps=3 values, got shape \(2,\)",
        id="trained-length",
    ),
    pytest.param(
        {"beta_start": 0.02, "beta_end": 0.0001}, r"beta_start=0\.02 is greater than beta_end=0\.0001", id="start>end"
    ),
    pytest.param(
        {"beta_schedule": "scaled_linear", "beta_start": 0.5, "beta_end": 0.1},
        r"beta_start=0\.5 is greater than beta_end=0\.1 for beta_schedule 'scaled_linear'",
        id="start>end-scaled",
    ),
    pytest.param({"num_train_timesteps": 0}, r"num_train_timesteps must be an integer >= 1, got 0", id="T=0"),
    pytest.param({"num_train_timesteps": -5}, r"num_train_timesteps must be an integer >= 1, got -5", id="T<0"),
    pytest.param(
        {"num_train_timesteps": 1, "rescale_betas_zero_snr": True},
        r"rescale_betas_zero_snr needs num_train_timesteps >= 2.*got 1",
        id="zero-snr-T=1",
    ),
    pytest.param({"steps_offset": -1}, r"steps_offset must be an integer >= 0, got -1", id="offset"),
    pytest.param({"clip_sample_range": 0.0}, r"clip_sample_range must be > 0, got 0\.0", id="clip-range"),
    pytest.param({"sample_max_value": -1.0}, r"sample_max_value must be > 0, got -1\.0", id="max-value"),
    pytest.param(
        {"dynamic_thresholding_ratio": 1.5}, r"dynamic_thresholding_ratio must lie in \(0, 1\], got 1\.5", id="ratio"
    ),
]


@pytest.mark.parametrize("cls", SCHEDULERS)
@pytest.mark.parametrize(("kwargs", "match"), BAD_CONFIGS)
def test_bad_config(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_bad_variance_type():
    with pytest.raises(ValueError, match=r"variance_type 'learned_log'.*allowed: fixed_small, fixed_small_log"):
        DDPMPosteriorScheduler(variance_type="learned_log")


BAD_SET_TIMESTEPS = [
    pytest.param({"num_inference_steps": 1001}, r"integer in \[1, 1000\].*got 1001", id="n>T"),
    pytest.param({"num_inference_steps": 0}, r"integer in \[1, 1000\].*got 0", id="n=0"),
    pytest.param({"num_inference_steps": -3}, r"integer in \[1, 1000\].*got -3", id="n<0"),
    pytest.param({"num_inference_steps": 2.5}, r"integer in \[1, 1000\].*got 2\.5", id="n-float"),
    pytest.param(
        {"num_inference_steps": 10, "timesteps": [9, 5]}, r"exactly one of num_inference_steps or", id="both"
    ),
    pytest.param({}, r"exactly one of num_inference_steps or timesteps", id="neither"),
    pytest.param({"timesteps": [9, 9, 1]}, r"strictly descending, got \[9, 9, 1\]", id="repeated"),
    pytest.param({"timesteps": [1, 5]}, r"strictly descending, got \[1, 5\]", id="ascending"),
    pytest.param({"timesteps": [1000, 3]}, r"lie in \[0, 999\].*got \[1000, 3\]", id="above"),
    pytest.param({"timesteps": [5, -1]}, r"lie in \[0, 999\].*got \[5, -1\]", id="below"),
    pytest.param({"timesteps": []}, r"timesteps must not be empty", id="empty"),
]


@pytest.mark.parametrize("cls", SCHEDULERS)
@pytest.mark.parametrize(("kwargs", "match"), BAD_SET_TIMESTEPS)
def test_bad_set_timesteps(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls().set_timesteps(**kwargs)


@pytest.mark.parametrize("cls", SCHEDULERS)
@pytest.mark.parametrize(("steps_offset", "n", "reached"), [(1, 1000, 1000), (2, 500, 1000), (200, 7, 1052)])
def test_leading_offset_past_last_timestep(cls, steps_offset, n, reached):
    scheduler = cls(steps_offset=steps_offset)
    with pytest.raises(
        ValueError, match=rf"steps_offset={steps_offset}.*reaches timestep {reached}.*below num_train_timesteps=1000"
    ):
        scheduler.set_timesteps(n)


@pytest.mark.parametrize("eta", [-0.1, 1.5, float("nan")])
def test_bad_eta(eta):
    scheduler = DDIMPosteriorScheduler()
    scheduler.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=rf"eta must lie in \[0, 1\].*got {eta}"):
        scheduler.step(x, scheduler.timesteps[0], x, eta=eta)


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_timestep_not_in_list(cls):
    scheduler = cls()
    scheduler.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=r"timestep 5 is not one of the current sampling timesteps.*\[900, 800"):
        scheduler.step(x, 5, x)


@pytest.mark.parametrize("variance_type", ["learned", "learned_range"])
def test_learned_variance_needs_two_halves(variance_type):
    scheduler = DDPMPosteriorScheduler(variance_type=variance_type)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match=rf"variance_type '{variance_type}' needs .* 2×3 channels, got 3"):
        scheduler.step(x, 999, x)


def test_ddim_generator_and_noise_exclusive():
    scheduler = DDIMPosteriorScheduler()
    scheduler.set_timesteps(10)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        scheduler.step(x, 900, x, eta=1.0, generator=torch.Generator(), variance_noise=x)


# --- random valid configs --------------------------------------------------------------------------------------------

NAMED_WITH_RANGE = ("linear", "scaled_linear", "quadratic", "sigmoid", "constant")


@st.composite
def valid_configs(draw, ddim: bool) -> dict:
    T = draw(st.integers(1, 1000))
    schedule = draw(st.sampled_from([*BETA_SCHEDULES, "trained_betas", "callable"]))
    config: dict = {"num_train_timesteps": T}
    if schedule in NAMED_WITH_RANGE:
        scale = draw(st.booleans())
        # β ≤ 0.5 keeps ᾱ above float64's underflow over 1000 steps (0.5^1000 ≈ 1e-301).
        cap = 0.5 * T / 1000 if scale else 0.5
        beta_end = draw(st.floats(1e-5 * cap, cap))
        beta_start = draw(st.floats(beta_end * 1e-3, beta_end))
        config |= {"beta_schedule": schedule, "beta_start": beta_start, "beta_end": beta_end}
        config["scale_betas_with_timesteps"] = scale
    elif schedule == "trained_betas":
        seed = draw(st.integers(0, 2**16))
        config["trained_betas"] = np.random.default_rng(seed).uniform(1e-4, 0.5, T).tolist()
    elif schedule == "callable":
        low, high = draw(st.floats(1e-5, 0.1)), draw(st.floats(0.1, 0.5))
        config["trained_betas"] = lambda t: low + (high - low) * t / T
    else:
        config["beta_schedule"] = schedule
    config["prediction_type"] = draw(st.sampled_from(["epsilon", "sample", "v_prediction"]))
    config["rescale_betas_zero_snr"] = T >= 2 and draw(st.booleans())
    config["timestep_spacing"] = spacing = draw(st.sampled_from(["leading", "trailing", "linspace"]))
    clipping = draw(st.sampled_from(["off", "clip", "threshold"]))
    config["clip_sample"] = clipping == "clip"
    config["thresholding"] = clipping == "threshold"
    if clipping == "clip":
        config["clip_sample_range"] = draw(st.floats(0.5, 3.0))
    if clipping == "threshold":
        config["dynamic_thresholding_ratio"] = draw(st.floats(0.5, 1.0))
        config["sample_max_value"] = draw(st.floats(1.0, 3.0))
    n = draw(st.none() | st.integers(1, min(T, 60)))
    offset = draw(st.integers(0, 3))
    if spacing == "leading" and n is not None and (n - 1) * (T // n) + offset > T - 1:
        offset = 0  # past T-1: a ValueError, tested in test_leading_offset_past_last_timestep
    config["steps_offset"] = offset
    if ddim:
        config["set_alpha_to_one"] = draw(st.booleans())
    else:
        config["variance_type"] = draw(
            st.sampled_from(
                ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
            )
        )
    return {"config": config, "num_inference_steps": n, "eta": draw(st.floats(0.0, 1.0)), "seed": draw(st.integers())}


def assert_tables_finite(process: GaussianDiffusion, where: str) -> None:
    for name, value in vars(process).items():
        if torch.is_tensor(value):
            assert torch.isfinite(value).all(), f"{where}.{name} is not finite: {value}"


def bounded_inputs(generator: torch.Generator, variance_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    sample = torch.rand(SHAPE, generator=generator) * 8 - 4
    model_output = torch.rand(SHAPE, generator=generator) * 8 - 4
    if variance_type == "learned":
        model_output = torch.cat([model_output, torch.rand(SHAPE, generator=generator) + 1e-6], 1)
    elif variance_type == "learned_range":
        model_output = torch.cat([model_output, torch.rand(SHAPE, generator=generator) * 2 - 1], 1)
    return sample, model_output


def check_random_config(cls, case: dict) -> None:
    config, n = case["config"], case["num_inference_steps"]
    scheduler = cls(**config)
    T = config["num_train_timesteps"]
    assert len(scheduler.config.trained_betas or []) in (0, T)
    assert_tables_finite(scheduler.diffusion, "diffusion")
    if n is not None:
        scheduler.set_timesteps(n)
    timesteps = scheduler.timesteps.tolist()
    assert len(timesteps) == (n or T)
    assert all(a > b for a, b in zip(timesteps, timesteps[1:])) and 0 <= timesteps[-1] and timesteps[0] < T
    assert_tables_finite(scheduler.sampling_diffusion, "sampling_diffusion")
    generator = torch.Generator().manual_seed(case["seed"] % 2**32)
    variance_type = config.get("variance_type")
    for t in scheduler.timesteps:
        sample, model_output = bounded_inputs(generator, variance_type)
        if cls is DDIMPosteriorScheduler:
            out = scheduler.step(model_output, t, sample, eta=case["eta"], generator=generator)
            back = scheduler.inverse_step(model_output, t, sample)
            assert torch.isfinite(back.prev_sample).all() and torch.isfinite(back.pred_original_sample).all()
        else:
            out = scheduler.step(model_output, t, sample, generator=generator)
        assert torch.isfinite(out.prev_sample).all(), f"prev_sample not finite at t={int(t)}"
        assert torch.isfinite(out.pred_original_sample).all(), f"pred_original_sample not finite at t={int(t)}"


@settings(max_examples=40, deadline=None)
@given(valid_configs(ddim=False))
def test_ddpm_random_configs_are_finite(case):
    check_random_config(DDPMPosteriorScheduler, case)


@settings(max_examples=40, deadline=None)
@given(valid_configs(ddim=True))
def test_ddim_random_configs_are_finite(case):
    check_random_config(DDIMPosteriorScheduler, case)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 1000), st.integers(1, 1000), st.sampled_from(["leading", "trailing", "linspace"]))
def test_spacing_gives_n_distinct_timesteps_in_range(T, n, spacing):
    """Every spacing yields exactly n strictly descending timesteps in [0, T-1] (trailing once gave n + 1 for some
    (T, n), ending at -1, e.g. (1000, 61); diffusers 0.42 still does)."""
    n = min(n, T)
    scheduler = DDPMPosteriorScheduler(num_train_timesteps=T, timestep_spacing=spacing)
    scheduler.set_timesteps(n)
    timesteps = scheduler.timesteps.tolist()
    assert len(timesteps) == n
    assert all(a > b for a, b in zip(timesteps, timesteps[1:]))
    assert timesteps[-1] >= 0 and timesteps[0] < T


@pytest.mark.parametrize("n", [61, 103, 998])
def test_trailing_known_bad_counts(n):
    scheduler = DDIMPosteriorScheduler(timestep_spacing="trailing")
    scheduler.set_timesteps(n)
    assert len(scheduler.timesteps) == n and int(scheduler.timesteps.min()) >= 0


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_snr_strictly_decreasing(schedule, rescale):
    """For every named schedule at T = 1000, SNR(t) strictly decreases; zero-SNR rescaling ends at ᾱ_T = 0 exactly."""
    for cls in SCHEDULERS:
        scheduler = cls(beta_schedule=schedule, rescale_betas_zero_snr=rescale)
        alphas_cumprod = scheduler.diffusion.alphas_cumprod
        snr = alphas_cumprod / (1 - alphas_cumprod)
        assert bool((snr[1:] < snr[:-1]).all()), f"{schedule}: SNR not strictly decreasing"
        assert torch.isfinite(snr).all()
        if rescale:
            assert alphas_cumprod[-1].item() == 0.0 and snr[-1].item() == 0.0
            assert alphas_cumprod[0].item() == pytest.approx(
                torch.cumprod(1 - make_betas(schedule), 0)[0].item(), rel=1e-12
            )
        else:
            assert alphas_cumprod[-1].item() > 0


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_callable_trained_betas_saved_as_json_list(cls, tmp_path):
    scheduler = cls(num_train_timesteps=10, trained_betas=lambda t: 0.01 + 0.002 * t)
    betas = scheduler.config.trained_betas
    assert isinstance(betas, list) and all(isinstance(b, float) for b in betas)
    assert betas == pytest.approx([0.01 + 0.002 * t for t in range(10)], rel=1e-15)
    json.dumps(dict(scheduler.config))
    scheduler.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["trained_betas"] == betas
    loaded = cls.from_pretrained(tmp_path)
    assert torch.equal(loaded.diffusion.alphas_cumprod, scheduler.diffusion.alphas_cumprod)


def test_a_beta_below_float64_resolution_is_rejected():
    with pytest.raises(ValueError, match=r"β\[0\] = 2.5e-17.*exceed float64's resolution"):
        DDPMPosteriorScheduler(num_train_timesteps=1, trained_betas=[2.5e-17])
