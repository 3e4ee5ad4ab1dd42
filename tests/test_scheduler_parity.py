"""Parity of `DDPMPosteriorScheduler` / `DDIMPosteriorScheduler` with diffusers 0.42's `DDPMScheduler` /
`DDIMScheduler` on every configuration both support, and the known differences, each tested as a difference.

Two kinds of parity:

- algorithm parity in float64: diffusers' float32 tables (`betas`, `alphas`, `alphas_cumprod`, `one`,
  `final_alpha_cumprod`) are replaced by our float64 ones and every input is float64, so whatever is left is the
  update rule itself; both must agree within 1e-10 on every checked step.
- float32 parity: diffusers builds its tables in float32, where 1 - ᾱ_t / ᾱ_{t-1} cancels catastrophically at small
  t (errors up to ~1e-3). Ours must be within 1e-5 of the float64 reference on every step, and within 1e-5 of
  diffusers on the steps where diffusers' float32 tables are accurate.

Known differences (tested as differences against plain float64 formulas written here, not `hf_ddpm.diffusion`):
DDIM's previous timestep for `linspace` and for `trailing` with N not dividing T; `fixed_large_log` (NaN in
diffusers); the last DDPM step when its timestep is > 0 (diffusers adds noise there, ours returns the posterior mean
as Algorithm 2 of Ho et al. does); the ᾱ = 0 step of a zero-terminal-SNR schedule with ε-prediction.

Each step is checked on its own random (sample, model output), so the subsampled steps need no trajectory.
"""

from __future__ import annotations

import itertools

import diffusers
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from hf_ddpm.schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler
from hf_ddpm.schedules import diffusers_solver_keys

T = 1000
SHAPE = (2, 3, 8, 8)
ALGORITHM_TOL = 1e-10
F32_TOL = 1e-5
# diffusers' float32 result counts as accurate on a step when it is this close to the float64 reference; then ours,
# itself within ~1e-6 of that reference, must be within F32_TOL of diffusers.
F32_ACCURATE = 5e-6

TRAINED_BETAS = np.geomspace(1e-4, 0.03, T).tolist()
SCHEDULES = {
    "linear": {},
    "scaled_linear": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012},
    "squaredcos_cap_v2": {"beta_schedule": "squaredcos_cap_v2"},
    "sigmoid": {"beta_schedule": "sigmoid"},
    "trained_betas": {"trained_betas": TRAINED_BETAS},
}
DDIM_SCHEDULES = [name for name in SCHEDULES if name != "sigmoid"]  # diffusers' DDIM has no sigmoid
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
PAIRS = {"ddpm": (DDPMPosteriorScheduler, DDPMScheduler), "ddim": (DDIMPosteriorScheduler, DDIMScheduler)}
CLIPPING = {
    "off": {"clip_sample": False},
    "clip": {"clip_sample": True},
    "clip_range": {"clip_sample": True, "clip_sample_range": 2.5},
    "threshold": {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 2.0},
}


# --- helpers ---------------------------------------------------------------------------------------------------------


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| relative to max(1, max |expected|): x̂_0 from ε reaches ~1e4 at t = T-1, where only
    relative precision is meaningful. NaN anywhere gives NaN (which fails every `<=`)."""
    expected = expected.double()
    scale = expected.abs().max().clamp(min=1.0)
    return float((actual.double() - expected).abs().max() / scale)


def checked_positions(n: int) -> list[int]:
    """Indices into a descending timestep list: all of a short list; of a long one the first 5, every 37th and the
    last 30 (t near 0, where float32 tables lose precision)."""
    if n <= 60:
        return list(range(n))
    return sorted(set(range(5)) | set(range(0, n, 37)) | set(range(n - 30, n)))


def step_inputs(
    t: int, variance_type: str | None = None, dtype: torch.dtype = torch.float64, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random x_t and model output for step t; for learned variance types the output has 2C channels (learned: a
    positive variance, learned_range: v ∈ [-1, 1])."""
    g = torch.Generator().manual_seed(1_000_003 * seed + int(t))
    sample = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    model_output = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    if variance_type == "learned":
        model_output = torch.cat([model_output, torch.rand(SHAPE, generator=g, dtype=torch.float64) * 0.02 + 1e-4], 1)
    elif variance_type == "learned_range":
        model_output = torch.cat([model_output, torch.rand(SHAPE, generator=g, dtype=torch.float64) * 2 - 1], 1)
    return sample.to(dtype), model_output.to(dtype)


def noise_generator(t: int, seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(1_000_003 * seed + 500_009 + int(t))


def drawn_noise(t: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """The noise diffusers' DDPM step draws from `noise_generator(t)` on CPU (`randn_tensor` -> `torch.randn`)."""
    return torch.randn(SHAPE, generator=noise_generator(t, seed), dtype=dtype)


def _zero_noise(shape, generator=None, device=None, dtype=None, layout=None):
    return torch.zeros(shape, device=device, dtype=dtype)


def _float32_noise(shape, generator=None, device=None, dtype=None, layout=None):
    """diffusers' draw, always in float32 then cast: a float64 reference then sees the float32 runs' noise."""
    return randn_tensor(shape, generator=generator, device=device, dtype=torch.float32).to(dtype)


def with_float64_tables(theirs: DDPMScheduler | DDIMScheduler, ours) -> DDPMScheduler | DDIMScheduler:
    """Replace diffusers' float32 tables by our float64 ones: what is left to compare is the algorithm."""
    theirs.betas = ours.diffusion.betas.clone()
    theirs.alphas = 1.0 - theirs.betas
    theirs.alphas_cumprod = ours.diffusion.alphas_cumprod.clone()
    if isinstance(theirs, DDPMScheduler):
        theirs.one = torch.tensor(1.0, dtype=torch.float64)
    else:
        theirs.final_alpha_cumprod = torch.tensor(ours.final_alpha_cumprod, dtype=torch.float64)
    return theirs


def set_both(ours, theirs, num_inference_steps: int | None = None, timesteps: list[int] | None = None) -> None:
    """Same sampling steps on both; `None, None` keeps ours at all T steps (diffusers' DDIM needs set_timesteps)."""
    if timesteps is not None:
        ours.set_timesteps(timesteps=timesteps)
        theirs.set_timesteps(timesteps=timesteps)
    elif num_inference_steps is not None:
        ours.set_timesteps(num_inference_steps)
        theirs.set_timesteps(num_inference_steps)
    elif isinstance(theirs, DDIMScheduler):
        theirs.set_timesteps(T)
    assert torch.equal(ours.timesteps, theirs.timesteps)


def reference_alphas_cumprod(config: dict) -> np.ndarray:
    """ᾱ of a linear schedule (or trained betas) with numpy in float64, independent of hf_ddpm."""
    if "trained_betas" in config:
        betas = np.asarray(config["trained_betas"], dtype=np.float64)
    else:
        assert config.get("beta_schedule", "linear") == "linear"
        betas = np.linspace(config.get("beta_start", 1e-4), config.get("beta_end", 0.02), T, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def reference_x0_eps(x: torch.Tensor, eps: torch.Tensor, a: float) -> torch.Tensor:
    return (x - (1 - a) ** 0.5 * eps) / a**0.5


def reference_ddim(x, eps, a_t: float, a_s: float, eta: float, z) -> torch.Tensor:
    """DDIM eq. 12 and 16 (Song et al. 2021) from t to s, ε-prediction, no clipping."""
    x0 = reference_x0_eps(x, eps, a_t)
    sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5
    return a_s**0.5 * x0 + (1 - a_s - sigma**2) ** 0.5 * eps + sigma * z


def reference_posterior_mean(x, eps, a_t: float, a_s: float) -> torch.Tensor:
    """μ̃ of q(x_s | x_t, x_0) with x̂_0 from ε (eq. 7, Ho et al. 2020)."""
    x0 = reference_x0_eps(x, eps, a_t)
    beta = 1 - a_t / a_s
    return a_s**0.5 * beta / (1 - a_t) * x0 + (1 - beta) ** 0.5 * (1 - a_s) / (1 - a_t) * x


# --- algorithm parity in float64 -------------------------------------------------------------------------------------


def assert_ddpm_algorithm_parity(
    monkeypatch: pytest.MonkeyPatch,
    config: dict,
    num_inference_steps: int | None = None,
    timesteps: list[int] | None = None,
) -> None:
    ours = DDPMPosteriorScheduler(**config)
    theirs = with_float64_tables(DDPMScheduler(**config), ours)
    set_both(ours, theirs, num_inference_steps, timesteps)
    n = len(ours.timesteps)
    for i in checked_positions(n):
        t = ours.timesteps[i]
        sample, model_output = step_inputs(int(t), config.get("variance_type"))
        got = ours.step(model_output, t, sample, variance_noise=drawn_noise(int(t), torch.float64))
        with monkeypatch.context() as patch:
            if i == n - 1 and t > 0:
                # diffusers adds noise on a last step with t > 0, ours does not: see
                # test_ddpm_last_step_adds_no_noise; here compare the means.
                patch.setattr(diffusers_ddpm, "randn_tensor", _zero_noise)
            want = theirs.step(model_output, t, sample, generator=noise_generator(int(t)))
        for name in ("prev_sample", "pred_original_sample"):
            error = max_error(getattr(got, name), getattr(want, name))
            assert error <= ALGORITHM_TOL, f"{name} differs by {error:.3g} at t={int(t)} ({i + 1}/{n}), {config}"


def assert_ddim_algorithm_parity(
    config: dict, num_inference_steps: int | None, eta: float, use_clipped_model_output: bool = False
) -> None:
    ours = DDIMPosteriorScheduler(**config)
    theirs = with_float64_tables(DDIMScheduler(**config), ours)
    set_both(ours, theirs, num_inference_steps)
    n = len(ours.timesteps)
    for i in checked_positions(n):
        t = ours.timesteps[i]
        sample, model_output = step_inputs(int(t))
        noise = drawn_noise(int(t), torch.float64)
        kwargs = {"eta": eta, "use_clipped_model_output": use_clipped_model_output, "variance_noise": noise}
        got = ours.step(model_output, t, sample, **kwargs)
        want = theirs.step(model_output, t, sample, **kwargs)
        for name in ("prev_sample", "pred_original_sample"):
            error = max_error(getattr(got, name), getattr(want, name))
            assert error <= ALGORITHM_TOL, f"{name} differs by {error:.3g} at t={int(t)} ({i + 1}/{n}), {config}"


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddpm_float64_schedule_prediction_variance(monkeypatch, schedule, prediction_type, variance_type):
    config = {**SCHEDULES[schedule], "prediction_type": prediction_type, "variance_type": variance_type}
    assert_ddpm_algorithm_parity(monkeypatch, {**config, "clip_sample": False})


def _spacing_cases() -> list:
    """(spacing, steps_offset, num_inference_steps); None is the default full schedule (no set_timesteps)."""
    cases = [("leading", 0, None)]
    cases += [(s, o, n) for s, o, n in itertools.product(("leading", "trailing", "linspace"), (0, 1), (50, 7))]
    return cases


DDPM_SPACING_PARAMS = [
    pytest.param(spacing, offset, n, clipping, prediction, VARIANCE_TYPES[k % len(VARIANCE_TYPES)], id=f"{k}")
    for k, ((spacing, offset, n), clipping, prediction) in enumerate(
        itertools.product(_spacing_cases(), CLIPPING, PREDICTION_TYPES)
    )
]


@pytest.mark.parametrize(
    ("spacing", "steps_offset", "num_inference_steps", "clipping", "prediction_type", "variance_type"),
    DDPM_SPACING_PARAMS,
)
def test_ddpm_float64_spacing_clipping(
    monkeypatch, spacing, steps_offset, num_inference_steps, clipping, prediction_type, variance_type
):
    config = {
        "timestep_spacing": spacing,
        "steps_offset": steps_offset,
        "prediction_type": prediction_type,
        "variance_type": variance_type,
        **CLIPPING[clipping],
    }
    assert_ddpm_algorithm_parity(monkeypatch, config, num_inference_steps)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
@pytest.mark.parametrize(("spacing", "num_inference_steps"), [("leading", None), ("trailing", 50), ("linspace", 7)])
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddpm_float64_zero_terminal_snr(monkeypatch, schedule, spacing, num_inference_steps, prediction_type):
    variance_type = VARIANCE_TYPES[(list(SCHEDULES).index(schedule) + len(spacing)) % len(VARIANCE_TYPES)]
    config = {
        **SCHEDULES[schedule],
        "rescale_betas_zero_snr": True,
        "prediction_type": prediction_type,
        "timestep_spacing": spacing,
        "variance_type": variance_type,
    }
    assert_ddpm_algorithm_parity(monkeypatch, config, num_inference_steps)


@pytest.mark.parametrize(
    "timesteps",
    [[999, 998, 500, 250, 10, 3, 2, 1, 0], [900, 899, 100, 1], [999], [0], [640, 320, 160, 80, 40, 20, 10, 5]],
)
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large", "learned_range"])
def test_ddpm_float64_custom_timesteps(monkeypatch, timesteps, variance_type):
    config = {"variance_type": variance_type, "clip_sample": False}
    assert_ddpm_algorithm_parity(monkeypatch, config, timesteps=timesteps)
    ours, theirs = DDPMPosteriorScheduler(), DDPMScheduler()
    ours.set_timesteps(timesteps=timesteps)
    theirs.set_timesteps(timesteps=timesteps)
    assert ours.custom_timesteps and theirs.custom_timesteps
    for t in timesteps:
        assert int(ours.previous_timestep(t)) == int(theirs.previous_timestep(t))


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", DDIM_SCHEDULES)
def test_ddim_float64_schedule_prediction_eta(schedule, prediction_type, eta, set_alpha_to_one):
    config = {
        **SCHEDULES[schedule],
        "prediction_type": prediction_type,
        "set_alpha_to_one": set_alpha_to_one,
        "clip_sample": False,
    }
    assert_ddim_algorithm_parity(config, 50, eta)


# diffusers' DDIM takes t - T // N as the previous timestep; these spacings put that on the timestep list.
DDIM_ON_LIST_CASES = [
    ("leading", 0, None),
    ("leading", 0, 50),
    ("leading", 1, 50),
    ("leading", 0, 7),
    ("leading", 1, 7),
    ("trailing", 0, 50),
    ("trailing", 1, 50),
    ("trailing", 0, 8),
    ("linspace", 0, T),
]
DDIM_SPACING_PARAMS = [
    pytest.param(spacing, offset, n, clipping, use_clipped, (0.0, 1.0)[k % 2], id=f"{k}")
    for k, ((spacing, offset, n), clipping, use_clipped) in enumerate(
        itertools.product(DDIM_ON_LIST_CASES, CLIPPING, (False, True))
    )
]


@pytest.mark.parametrize(
    ("spacing", "steps_offset", "num_inference_steps", "clipping", "use_clipped_model_output", "eta"),
    DDIM_SPACING_PARAMS,
)
def test_ddim_float64_spacing_clipping(
    spacing, steps_offset, num_inference_steps, clipping, use_clipped_model_output, eta
):
    config = {
        "timestep_spacing": spacing,
        "steps_offset": steps_offset,
        "prediction_type": PREDICTION_TYPES[(num_inference_steps or 0) % 3],
        **CLIPPING[clipping],
    }
    assert_ddim_algorithm_parity(config, num_inference_steps, eta, use_clipped_model_output)


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize(("spacing", "num_inference_steps"), [("leading", 50), ("trailing", 50), ("trailing", 8)])
@pytest.mark.parametrize("schedule", DDIM_SCHEDULES)
def test_ddim_float64_zero_terminal_snr(schedule, spacing, num_inference_steps, eta):
    config = {
        **SCHEDULES[schedule],
        "rescale_betas_zero_snr": True,
        "prediction_type": "v_prediction",
        "timestep_spacing": spacing,
    }
    assert_ddim_algorithm_parity(config, num_inference_steps, eta)


def test_noise_replica_is_randn_tensor():
    """`drawn_noise` is exactly what diffusers' DDPM step draws from the same seeded generator."""
    for dtype in (torch.float32, torch.float64):
        want = randn_tensor(SHAPE, generator=noise_generator(17), device=torch.device("cpu"), dtype=dtype)
        assert torch.equal(drawn_noise(17, dtype), want)


def test_ddim_positional_eta_matches():
    """`eta` is DDIM's 4th positional argument in both."""
    ours, theirs = DDIMPosteriorScheduler(clip_sample=False), DDIMScheduler(clip_sample=False)
    theirs = with_float64_tables(theirs, ours)
    set_both(ours, theirs, 20)
    sample, model_output = step_inputs(500)
    z = drawn_noise(500, torch.float64)
    got = ours.step(model_output, ours.timesteps[5], sample, 0.7, False, None, z)
    want = theirs.step(model_output, theirs.timesteps[5], sample, 0.7, False, None, z)
    assert max_error(got.prev_sample, want.prev_sample) <= ALGORITHM_TOL


# --- float32 parity --------------------------------------------------------------------------------------------------


def float32_positions(n: int) -> list[int]:
    """Every step with t < 120 (where diffusers' float32 β cancels) and every 20th above."""
    return sorted(set(range(0, n, 20)) | set(range(max(0, n - 120), n)))


def assert_float32_parity(monkeypatch: pytest.MonkeyPatch, ours_cls, theirs_cls, config: dict, step_kwargs: dict):
    monkeypatch.setattr(diffusers_ddpm, "randn_tensor", _float32_noise)
    ours32 = ours_cls(**config)
    theirs32 = theirs_cls(**config)
    reference = with_float64_tables(theirs_cls(**config), ours32)  # == ours in float64 by the tests above
    is_ddim = ours_cls is DDIMPosteriorScheduler
    if is_ddim:
        theirs32.set_timesteps(T)
        reference.set_timesteps(T)
    n = len(ours32.timesteps)
    for i in float32_positions(n):
        t = ours32.timesteps[i]
        sample, model_output = step_inputs(int(t), dtype=torch.float32, seed=1)
        z = drawn_noise(int(t), torch.float32, seed=1)
        if is_ddim:
            got = ours32.step(model_output, t, sample, variance_noise=z, **step_kwargs)
            want = theirs32.step(model_output, t, sample, variance_noise=z, **step_kwargs)
            ref = reference.step(model_output.double(), t, sample.double(), variance_noise=z.double(), **step_kwargs)
        else:
            got = ours32.step(model_output, t, sample, variance_noise=z)
            want = theirs32.step(model_output, t, sample, generator=noise_generator(int(t), 1))
            ref = reference.step(model_output.double(), t, sample.double(), generator=noise_generator(int(t), 1))
        assert got.prev_sample.dtype == torch.float32
        theirs_accurate = True
        for name in ("prev_sample", "pred_original_sample"):
            ours_error = max_error(getattr(got, name), getattr(ref, name))
            assert ours_error <= F32_TOL, f"ours {name} is {ours_error:.3g} from the float64 reference at t={int(t)}"
            theirs_accurate &= max_error(getattr(want, name), getattr(ref, name)) <= F32_ACCURATE
        if theirs_accurate:  # compared only where diffusers' float32 rounding happens to be accurate on this CPU
            for name in ("prev_sample", "pred_original_sample"):
                error = max_error(getattr(got, name), getattr(want, name))
                assert error <= F32_TOL, f"{name} differs from diffusers by {error:.3g} at t={int(t)}"


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_ddpm_float32(monkeypatch, schedule, prediction_type):
    config = {**SCHEDULES[schedule], "prediction_type": prediction_type, "clip_sample": False}
    assert_float32_parity(monkeypatch, DDPMPosteriorScheduler, DDPMScheduler, config, {})


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("schedule", DDIM_SCHEDULES)
def test_ddim_float32(monkeypatch, schedule, prediction_type, eta):
    config = {**SCHEDULES[schedule], "prediction_type": prediction_type, "clip_sample": False}
    assert_float32_parity(monkeypatch, DDIMPosteriorScheduler, DDIMScheduler, config, {"eta": eta})


def test_float32_small_t_stays_accurate(monkeypatch):
    """At t ≤ 20, where 1 - ᾱ_t/ᾱ_{t-1} cancels in float32 tables, our float32 step stays within 1e-6 of the float64
    reference (diffusers' float32 tables are not asserted on: their rounding varies by CPU and version)."""
    monkeypatch.setattr(diffusers_ddpm, "randn_tensor", _float32_noise)
    ours = DDPMPosteriorScheduler(clip_sample=False)
    reference = with_float64_tables(DDPMScheduler(clip_sample=False), ours)
    worst_ours = 0.0
    for t in range(1, 21):
        sample, model_output = step_inputs(t, dtype=torch.float32, seed=2)
        got = ours.step(model_output, t, sample, variance_noise=drawn_noise(t, torch.float32, seed=2))
        ref = reference.step(model_output.double(), t, sample.double(), generator=noise_generator(t, 2))
        worst_ours = max(worst_ours, max_error(got.prev_sample, ref.prev_sample))
    assert worst_ours <= 1e-6


# --- known differences -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize(("spacing", "num_inference_steps"), [("linspace", 50), ("linspace", 7), ("trailing", 7)])
def test_ddim_previous_timestep_is_the_next_list_entry(spacing, num_inference_steps, eta):
    """Ours steps between consecutive entries of `timesteps`, checked against the plain DDIM update. These cases are
    the ones where t - T // N (diffusers' choice) is off the list, so the difference is exercised."""
    config = {"timestep_spacing": spacing, "clip_sample": False}
    ours = DDIMPosteriorScheduler(**config)
    ours.set_timesteps(num_inference_steps)
    alphas_cumprod = reference_alphas_cumprod(config)
    timesteps = ours.timesteps.tolist()
    off_list = 0
    for i, t in enumerate(timesteps):
        s_ours = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t = float(alphas_cumprod[t])
        a_ours = float(alphas_cumprod[s_ours]) if s_ours >= 0 else 1.0
        sample, eps = step_inputs(t)
        z = drawn_noise(t, torch.float64)
        got = ours.step(eps, t, sample, eta=eta, variance_noise=z).prev_sample
        assert int(ours.previous_timestep(t)) == s_ours
        assert max_error(got, reference_ddim(sample, eps, a_t, a_ours, eta, z)) <= ALGORITHM_TOL
        off_list += t - T // num_inference_steps != s_ours
    assert off_list > 0


@pytest.mark.parametrize("num_inference_steps", [None, 50])
def test_fixed_large_log_is_fixed_large(num_inference_steps):
    """`fixed_large_log` samples N(μ̃, β_t) like fixed_large (diffusers takes the square root of log β there)."""
    config = {"variance_type": "fixed_large_log", "clip_sample": False}
    ours = DDPMPosteriorScheduler(**config)
    large = DDPMPosteriorScheduler(**{**config, "variance_type": "fixed_large"})
    for scheduler in (ours, large):
        if num_inference_steps:
            scheduler.set_timesteps(num_inference_steps)
    alphas_cumprod = reference_alphas_cumprod(config)
    timesteps = ours.timesteps.tolist()
    for i in checked_positions(len(timesteps)):
        t = timesteps[i]
        s = timesteps[i + 1] if i + 1 < len(timesteps) else -1
        a_t, a_s = float(alphas_cumprod[t]), (float(alphas_cumprod[s]) if s >= 0 else 1.0)
        sample, eps = step_inputs(t)
        z = drawn_noise(t, torch.float64)
        got = ours.step(eps, t, sample, variance_noise=z).prev_sample
        assert torch.equal(got, large.step(eps, t, sample, variance_noise=z).prev_sample)
        want = reference_posterior_mean(sample, eps, a_t, a_s)
        if s >= 0:
            want = want + (1 - a_t / a_s) ** 0.5 * z
        assert max_error(got, want) <= ALGORITHM_TOL


LAST_STEP_CASES = [
    pytest.param({"timestep_spacing": "leading", "steps_offset": 1}, 50, None, id="leading-offset1"),
    pytest.param({"timestep_spacing": "trailing"}, 50, None, id="trailing"),
    pytest.param({}, None, [700, 300, 20], id="custom"),
]


@pytest.mark.parametrize("variance_type", VARIANCE_TYPES)
@pytest.mark.parametrize(("spacing", "num_inference_steps", "timesteps"), LAST_STEP_CASES)
def test_ddpm_last_step_adds_no_noise(spacing, num_inference_steps, timesteps, variance_type):
    """On the last step ours returns the posterior mean (Algorithm 2 of Ho et al.: z = 0 at the last step), even when
    that step's timestep is > 0. With ᾱ_prev = 1 that mean is x̂_0 itself."""
    config = {**spacing, "variance_type": variance_type, "clip_sample": False}
    ours = DDPMPosteriorScheduler(**config)
    if timesteps is not None:
        ours.set_timesteps(timesteps=timesteps)
    elif num_inference_steps is not None:
        ours.set_timesteps(num_inference_steps)
    t = int(ours.timesteps[-1])
    assert t > 0
    a_t = float(ours.diffusion.alphas_cumprod[t])
    sample, model_output = step_inputs(t, variance_type)
    first = ours.step(model_output, t, sample, variance_noise=drawn_noise(t, torch.float64))
    second = ours.step(model_output, t, sample, variance_noise=drawn_noise(t + 1, torch.float64))
    assert torch.equal(first.prev_sample, second.prev_sample)
    assert max_error(first.prev_sample, first.pred_original_sample) <= ALGORITHM_TOL
    eps = model_output[:, : SHAPE[1]]
    assert max_error(first.prev_sample, reference_x0_eps(sample, eps, a_t)) <= ALGORITHM_TOL


def test_zero_terminal_snr_epsilon_first_step():
    """With ᾱ_{T-1} = 0, x̂_0 from ε divides by zero: unclipped, ours stays finite (its ᾱ floor); clipped to
    [-1, 1], ours and diffusers give the same step."""
    for ours_cls, theirs_cls in ((DDPMPosteriorScheduler, DDPMScheduler), (DDIMPosteriorScheduler, DDIMScheduler)):
        for clip_sample in (False, True):
            config = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "clip_sample": clip_sample}
            ours = ours_cls(**config)
            theirs = with_float64_tables(theirs_cls(**config), ours)
            set_both(ours, theirs, 10)
            sample, eps = step_inputs(999)
            z = drawn_noise(999, torch.float64)
            got = ours.step(eps, 999, sample, variance_noise=z)
            assert torch.isfinite(got.prev_sample).all() and torch.isfinite(got.pred_original_sample).all()
            if clip_sample:
                if theirs_cls is DDPMScheduler:
                    want = theirs.step(eps, 999, sample, generator=noise_generator(999))
                else:
                    want = theirs.step(eps, 999, sample, variance_noise=z)
                assert max_error(got.pred_original_sample, want.pred_original_sample) <= ALGORITHM_TOL
                assert max_error(got.prev_sample, want.prev_sample) <= ALGORITHM_TOL


def test_ddim_zero_terminal_snr_eta_one_float32_first_step():
    """At ᾱ_t = 0 and η = 1, σ² = 1 - ᾱ_prev, so √(1 - ᾱ_prev - σ²) has a radicand that float32 may round below 0;
    ours floors it at 0 and returns √ᾱ_prev x̂_0 + σ z, checked against the float64 reference."""
    config = {
        **SCHEDULES["scaled_linear"],
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
        "prediction_type": "v_prediction",
        "clip_sample": False,
    }
    ours = DDIMPosteriorScheduler(**config)
    ours.set_timesteps(10)
    sample, v = step_inputs(999, dtype=torch.float32)
    z = drawn_noise(999, torch.float32)
    got = ours.step(v, 999, sample, eta=1.0, variance_noise=z)
    a_prev = float(ours.diffusion.alphas_cumprod[899])
    reference = a_prev**0.5 * -v.double() + (1 - a_prev) ** 0.5 * z.double()  # x̂_0 = -v at ᾱ_t = 0
    assert torch.isfinite(got.prev_sample).all()
    assert max_error(got.prev_sample, reference) <= 1e-6


@pytest.mark.parametrize("kind", list(PAIRS))
def test_trailing_spacing_never_gives_minus_one(kind):
    """For (T, N) = (1000, 61), `np.arange(T, 0, -T / N)` can give a 62nd entry, -1, through float error (diffusers'
    trailing spacing); ours gives exactly N timesteps, all in [0, T), equal to round(T - k T / N) - 1."""
    ours = PAIRS[kind][0](timestep_spacing="trailing")
    ours.set_timesteps(61)
    want = [round(T - k * T / 61) - 1 for k in range(61)]
    assert ours.timesteps.tolist() == want


# --- the forward process ---------------------------------------------------------------------------------------------


FORWARD_CASES = [
    pytest.param(schedule, kind, id=f"{schedule}-{kind}")
    for schedule in [*SCHEDULES, "zero_snr"]
    for kind in ("ddpm", "ddim")
    if not (schedule == "sigmoid" and kind == "ddim")  # diffusers' DDIMScheduler has no sigmoid schedule
]


@pytest.mark.parametrize("method", ["add_noise", "get_velocity"])
@pytest.mark.parametrize(("schedule", "kind"), FORWARD_CASES)
def test_forward_process_parity(schedule, kind, method):
    ours_cls, theirs_cls = PAIRS[kind]
    config = {"rescale_betas_zero_snr": True} if schedule == "zero_snr" else SCHEDULES[schedule]
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(8, 3, 8, 8, generator=g)
    noise = torch.randn(8, 3, 8, 8, generator=g)
    timesteps = torch.cat([torch.tensor([0, 1, T - 1]), torch.randint(0, T, (5,), generator=g)])
    ours, theirs = ours_cls(**config), theirs_cls(**config)
    reference = with_float64_tables(theirs_cls(**config), ours)
    ref = getattr(reference, method)(x0.double(), noise.double(), timesteps)
    assert max_error(getattr(ours, method)(x0.double(), noise.double(), timesteps), ref) <= 1e-12
    got = getattr(ours, method)(x0, noise, timesteps)
    assert got.dtype == torch.float32 and got.shape == x0.shape
    assert max_error(got, ref) <= 1e-6
    assert max_error(got, getattr(theirs, method)(x0, noise, timesteps)) <= F32_TOL


# --- configs ---------------------------------------------------------------------------------------------------------

CONFIGS = {
    "default": {},
    "full": {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": "v_prediction",
        "clip_sample": False,
        "thresholding": True,
        "sample_max_value": 2.0,
        "timestep_spacing": "trailing",
        "steps_offset": 1,
        "rescale_betas_zero_snr": True,
    },
    "trained": {"trained_betas": TRAINED_BETAS, "prediction_type": "sample", "clip_sample_range": 2.0},
}


def public(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def step_outputs(scheduler, num_inference_steps: int = 10) -> list[torch.Tensor]:
    """prev_sample of every step on fixed float32 inputs (η = 0.5 for DDIM, fixed noise)."""
    scheduler.set_timesteps(num_inference_steps)
    outputs = []
    for t in scheduler.timesteps:
        sample, model_output = step_inputs(int(t), getattr(scheduler.config, "variance_type", None), torch.float32)
        kwargs = {"variance_noise": drawn_noise(int(t), torch.float32)}
        if isinstance(scheduler, (DDIMScheduler, DDIMPosteriorScheduler)):
            kwargs["eta"] = 0.5
        else:
            kwargs["generator"] = noise_generator(int(t))
            if isinstance(scheduler, DDPMScheduler):
                del kwargs["variance_noise"]
        outputs.append(scheduler.step(model_output, t, sample, **kwargs).prev_sample)
    return outputs


def assert_same_steps(a, b) -> None:
    for x, y in zip(step_outputs(a), step_outputs(b), strict=True):
        assert torch.equal(x, y)


def assert_close_steps(ours, theirs, tol: float) -> None:
    for x, y in zip(step_outputs(ours), step_outputs(theirs), strict=True):
        assert max_error(x, y) <= tol


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("kind", list(PAIRS))
def test_config_round_trip_through_diffusers(kind, config_name):
    """ours -> diffusers' class (from_config) -> ours: same config and the same steps; diffusers' class built from
    our config is the one built from the same kwargs."""
    ours_cls, theirs_cls = PAIRS[kind]
    config = CONFIGS[config_name]
    ours = ours_cls(**config)
    theirs = theirs_cls.from_config(ours.config)
    shared = public(theirs.config).keys() & public(ours.config).keys()
    assert shared >= set(config)
    assert {k: theirs.config[k] for k in shared} == {k: ours.config[k] for k in shared}
    assert_same_steps(theirs, theirs_cls(**config))
    back = ours_cls.from_config(theirs.config)
    assert public(back.config) == public(ours.config)
    assert_same_steps(back, ours)
    # float32 behaviour: the same process up to diffusers' float32 tables (10 leading/trailing steps, no small t).
    assert_close_steps(ours, theirs, 1e-4)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("kind", list(PAIRS))
def test_config_from_diffusers(kind, config_name):
    """diffusers' config -> ours: every key carries over, and the scheduler equals ours built from the kwargs."""
    ours_cls, theirs_cls = PAIRS[kind]
    config = CONFIGS[config_name]
    theirs = theirs_cls(**config)
    ours = ours_cls.from_config(theirs.config)
    # keys ours adds for diffusers' solvers, each the same process (tests/test_diffusers_solvers.py)
    added = diffusers_solver_keys(theirs.config)
    for key, value in public(theirs.config).items():
        assert ours.config[key] == added.get(key, value), key
    assert_same_steps(ours, ours_cls(**config))


@pytest.mark.parametrize("config_name", list(CONFIGS))
def test_config_ddpm_ddim_round_trip(config_name):
    """DDPM -> DDIM -> DDPM keeps the config; DDIM at η = 1 is the DDPM fixed_small posterior step."""
    config = {**CONFIGS[config_name], "clip_sample": False, "thresholding": False}
    ddpm = DDPMPosteriorScheduler(**config, variance_type="fixed_small")
    ddim = DDIMPosteriorScheduler.from_config(ddpm.config)
    for key in public(ddim.config).keys() & public(ddpm.config).keys():
        assert ddim.config[key] == ddpm.config[key], key
    back = DDPMPosteriorScheduler.from_config(ddim.config)
    assert public(back.config) == public(ddpm.config)
    assert_same_steps(back, ddpm)
    for scheduler in (ddpm, ddim):
        scheduler.set_timesteps(20)
    for t in ddpm.timesteps:
        sample, model_output = step_inputs(int(t))
        z = drawn_noise(int(t), torch.float64)
        want = ddpm.step(model_output, t, sample, variance_noise=z).prev_sample
        got = ddim.step(model_output, t, sample, eta=1.0, variance_noise=z).prev_sample
        # √(1 - ᾱ_prev - σ²) cancels to ~0 at a zero-SNR step, so its float64 rounding shows up as ~1e-8.
        assert max_error(got, want) <= 1e-7


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("kind", list(PAIRS))
def test_save_and_load_pretrained(tmp_path, kind, config_name):
    ours_cls, _ = PAIRS[kind]
    ours = ours_cls(**CONFIGS[config_name])
    ours.save_pretrained(tmp_path)
    loaded = ours_cls.from_pretrained(tmp_path)
    assert type(loaded) is ours_cls
    assert public(loaded.config) == public(ours.config)
    assert_same_steps(loaded, ours)


@pytest.mark.parametrize("kind", list(PAIRS))
def test_compatibles_resolve(kind):
    """`compatibles` resolves names inside diffusers' namespace, where `import hf_ddpm` registers our classes: all four
    DDPM/DDIM classes are found, and each loads our config with the shared keys intact."""
    ours_cls, _ = PAIRS[kind]
    assert getattr(diffusers, ours_cls.__name__) is ours_cls
    compatibles = ours_cls().compatibles
    assert {DDPMScheduler, DDIMScheduler, DDPMPosteriorScheduler, DDIMPosteriorScheduler} <= set(compatibles)
    ours = ours_cls(**CONFIGS["full"])
    for cls in compatibles:
        loaded = cls.from_config(ours.config)
        for key in ("beta_schedule", "prediction_type", "timestep_spacing", "rescale_betas_zero_snr", "steps_offset"):
            assert loaded.config[key] == ours.config[key], (cls.__name__, key)
