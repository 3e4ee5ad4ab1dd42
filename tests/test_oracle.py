"""The analytic oracle: for data x_0 ~ N(m, s²) the exact ε-prediction model is known in closed form,
so every sampler must reproduce N(m, s²) and the variational bound must sit above the exact NLL.

The oracle itself (`GaussianOracle`, `MEAN`, `STD`, `oracle_variational_bound`) lives in helpers.py; import it from
there (the names imported here stay importable from this module for older code).
"""

import math

import pytest
import torch
from helpers import MEAN, STD, GaussianOracle, exact_sampler_moments, oracle_variational_bound

from hf_ddpm import diffusion as D
from hf_ddpm.schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler

# 12,288 independent scalars (the oracle is elementwise): standard errors ~0.005 (mean) and ~0.003 (variance).
# 256 dimensions per sample, so that the corrector's per-sample norms ‖z‖ and ‖score‖ concentrate as for images.
SHAPE = (48, 1, 16, 16)


def _moments_match(x: torch.Tensor, mean: float = MEAN, variance: float = STD**2) -> None:
    """Sample mean and variance within 4 standard errors of the given Gaussian's."""
    assert torch.isfinite(x).all()
    n = x.numel()
    assert x.mean().item() == pytest.approx(mean, abs=4 * math.sqrt(variance / n))
    assert x.var().item() == pytest.approx(variance, abs=4 * variance * math.sqrt(2 / n))


def _sample(scheduler, steps: int, seed: int = 0, corrector_steps: int = 0, **step_kwargs) -> torch.Tensor:
    oracle = GaussianOracle(scheduler.diffusion.alphas_cumprod)
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=generator)
    for t in scheduler.timesteps.tolist():
        for _ in range(corrector_steps):
            x = scheduler.langevin_step(oracle(x, t), t, x, generator=generator)
        x = scheduler.step(oracle(x, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


@pytest.mark.parametrize(
    ("kind", "steps", "eta", "max_bias"),
    [("ddpm", 1000, 1.0, 0.02), ("ddpm", 100, 1.0, 0.15), ("ddim", 50, 0.0, 0.12), ("ddim", 50, 1.0, 0.25)],
)
def test_samplers_reproduce_the_data_distribution(kind, steps, eta, max_bias):
    """Samples follow the sampler's exact output law within sampling error, and that law is N(m, s²) up to the
    stated discretization bias: a few-step sampler with the posterior-mean (E[x_0|x_t]) model underestimates the
    variance (each step keeps only the regression part of x_0), which vanishes as the steps grow."""
    if kind == "ddpm":
        scheduler, kwargs = DDPMPosteriorScheduler(clip_sample=False), {}
    else:
        scheduler, kwargs = DDIMPosteriorScheduler(clip_sample=False), {"eta": eta}
    x = _sample(scheduler, steps, **kwargs)
    mean, var = exact_sampler_moments(
        scheduler.diffusion.alphas_cumprod, scheduler.timesteps.tolist(), eta, kind == "ddim"
    )
    _moments_match(x, mean, var)
    assert abs(mean - MEAN) < 2e-3
    assert abs(var - STD**2) / STD**2 < max_bias


def test_sampler_bias_falls_with_steps():
    biases = []
    for steps in (20, 50, 200, 1000):
        scheduler = DDIMPosteriorScheduler()
        scheduler.set_timesteps(steps)
        _, var = exact_sampler_moments(scheduler.diffusion.alphas_cumprod, scheduler.timesteps.tolist(), 0.0, True)
        biases.append(abs(var - STD**2))
    assert biases == sorted(biases, reverse=True) and biases[-1] < 0.002


def test_langevin_corrector_keeps_the_marginal_of_x_t():
    # r = 0.1: unadjusted Langevin is biased by a factor ≈ 1 / (1 - ε/2v) ≈ 1 + r², inside the tolerance
    scheduler = DDPMPosteriorScheduler(clip_sample=False, corrector_snr=0.1)
    oracle = GaussianOracle(scheduler.diffusion.alphas_cumprod)
    generator = torch.Generator().manual_seed(1)
    t = 300
    alpha_bar = scheduler.diffusion.alphas_cumprod[t].item()
    x0 = MEAN + STD * torch.randn(SHAPE, dtype=torch.float64, generator=generator)
    x = D.q_sample(x0, torch.randn(SHAPE, dtype=torch.float64, generator=generator), alpha_bar)
    for _ in range(100):
        x = scheduler.langevin_step(oracle(x, t), t, x, generator=generator)
    _moments_match(x, math.sqrt(alpha_bar) * MEAN, alpha_bar * STD**2 + 1 - alpha_bar)


def test_langevin_corrector_in_the_sampling_loop_keeps_the_data_distribution():
    """DDPM 1000 steps with one corrector step each: the corrector leaves the (already right) law in place."""
    _moments_match(_sample(DDPMPosteriorScheduler(clip_sample=False, corrector_snr=0.1), 1000, corrector_steps=1))


def test_langevin_corrector_moves_a_wrong_distribution_towards_the_right_one():
    scheduler = DDPMPosteriorScheduler(clip_sample=False)
    oracle = GaussianOracle(scheduler.diffusion.alphas_cumprod)
    generator = torch.Generator().manual_seed(2)
    t = 100
    alpha_bar = scheduler.diffusion.alphas_cumprod[t].item()
    target_variance = alpha_bar * STD**2 + 1 - alpha_bar
    x = 3.0 * torch.randn(SHAPE, dtype=torch.float64, generator=generator)
    before = abs(x.var().item() - target_variance)
    for _ in range(200):
        x = scheduler.langevin_step(oracle(x, t), t, x, generator=generator)
    assert abs(x.var().item() - target_variance) < 0.5 * before


def test_ddim_inversion_then_sampling_reconstructs_with_falling_error():
    generator = torch.Generator().manual_seed(3)
    x0 = MEAN + STD * torch.randn(256, 1, 2, 2, dtype=torch.float64, generator=generator)
    errors = []
    for steps in (10, 50, 250):
        scheduler = DDIMPosteriorScheduler(clip_sample=False)
        oracle = GaussianOracle(scheduler.diffusion.alphas_cumprod)
        scheduler.set_timesteps(steps)
        x = x0
        for t in reversed(scheduler.timesteps.tolist()):
            x = scheduler.inverse_step(oracle(x, t), t, x).prev_sample
        # the inverted latents are standard-normal-like: the deterministic map pushes N(m, s²) to ~N(0, 1)
        assert abs(x.std().item() - 1.0) < 0.2
        for t in scheduler.timesteps.tolist():
            x = scheduler.step(oracle(x, t), t, x, eta=0.0).prev_sample
        errors.append((x - x0).abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.05


def test_variational_bound_is_above_the_exact_nll_and_tightens_with_more_steps():
    exact_nll = 0.5 * math.log(2 * math.pi * STD**2) + 0.5  # E[-log N(x; m, s²)] per dimension
    bound_100 = oracle_variational_bound(100)
    bound_1000 = oracle_variational_bound(1000)
    assert bound_100 > bound_1000 > exact_nll
    assert bound_1000 - exact_nll < 0.5 * (bound_100 - exact_nll)
