"""Independent checks of the formulas in `diffusion.py`, in float64, against first principles (not diffusers)."""

import math

import numpy as np
import pytest
import torch

from hf_ddpm import diffusion as D
from hf_ddpm.schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler
from hf_ddpm.schedules import BETA_SCHEDULES, make_betas


def _log_gauss(x, mean, var):
    return -0.5 * (x - mean) ** 2 / var - 0.5 * np.log(2 * np.pi * var)


@pytest.mark.parametrize("t", [1, 10, 500, 999])
def test_posterior_is_the_bayes_product(t):
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): integrate the product on a grid, compare mean and variance."""
    process = D.GaussianDiffusion(make_betas("linear", 1000))
    alpha_bar, alpha_bar_prev = process.alphas_cumprod[t].item(), process.alphas_cumprod_prev[t].item()
    beta = process.betas[t].item()
    x0, x_t = 0.7, -0.4
    grid = np.linspace(-6, 6, 400_001)
    # in log space: at small t both factors are far narrower than the distance between x_t and x_0
    log_density = _log_gauss(x_t, np.sqrt(1 - beta) * grid, beta) + _log_gauss(
        grid, np.sqrt(alpha_bar_prev) * x0, 1 - alpha_bar_prev
    )
    density = np.exp(log_density - log_density.max())
    density /= np.trapezoid(density, grid)
    mean = np.trapezoid(grid * density, grid)
    variance = np.trapezoid((grid - mean) ** 2 * density, grid)
    mu = D.posterior_mean(
        torch.tensor([x0], dtype=torch.float64), torch.tensor([x_t], dtype=torch.float64), alpha_bar, alpha_bar_prev
    )
    assert mu.item() == pytest.approx(mean, abs=1e-7)
    assert D.posterior_variance(alpha_bar, alpha_bar_prev) == pytest.approx(variance, rel=1e-5)
    assert process.posterior_variance[t].item() == pytest.approx(variance, rel=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2", "sigmoid"])
def test_eps_form_of_posterior_mean_equals_x0_form(schedule):
    """eq. 11 of Ho et al. (μ̃ from ε) equals eq. 7 (μ̃ from x_0) when ε and x_0 are consistent with x_t."""
    process = D.GaussianDiffusion(make_betas(schedule, 1000))
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=generator)
    eps = torch.randn(6, 3, 4, 4, dtype=torch.float64, generator=generator)
    t = torch.tensor([1, 2, 50, 400, 998, 999])
    alpha_bar = process.alpha_bar(t, x0)
    alpha_bar_prev = process._at(process.alphas_cumprod_prev, t, x0)
    x_t = D.q_sample(x0, eps, alpha_bar)
    from_x0 = D.posterior_mean(x0, x_t, alpha_bar, alpha_bar_prev)
    from_eps = D.posterior_mean_from_eps(x_t, eps, alpha_bar, alpha_bar_prev)
    torch.testing.assert_close(from_eps, from_x0, rtol=1e-11, atol=1e-11)


def test_prediction_types_convert_exactly():
    generator = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 3, 3, dtype=torch.float64, generator=generator)
    eps = torch.randn(5, 2, 3, 3, dtype=torch.float64, generator=generator)
    alpha_bar = torch.tensor([0.9999, 0.9, 0.5, 0.01, 4e-5], dtype=torch.float64).reshape(-1, 1, 1, 1)
    x_t = D.q_sample(x0, eps, alpha_bar)
    v = D.v_from_x0_eps(x0, eps, alpha_bar)
    for kind, output in [("epsilon", eps), ("sample", x0), ("v_prediction", v)]:
        torch.testing.assert_close(D.model_output_to_x0(output, x_t, alpha_bar, kind), x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(D.model_output_to_eps(output, x_t, alpha_bar, kind), eps, rtol=0, atol=1e-9)
        torch.testing.assert_close(D.training_target(x0, eps, alpha_bar, kind), output, rtol=0, atol=0)
    torch.testing.assert_close(D.eps_from_x0(x_t, x0, alpha_bar), eps, rtol=0, atol=1e-9)
    # v is the rotation of (x0, ε) by the angle φ with ᾱ = cos²φ: the norm is kept.
    torch.testing.assert_close(v**2 + x_t**2, x0**2 + eps**2, rtol=0, atol=1e-9)


def test_q_sample_moments_and_q_step_compose():
    """Chaining q(x_t|x_{t-1}) from x_0 gives q(x_t|x_0): mean √ᾱ x_0 and variance 1 - ᾱ."""
    betas = make_betas("linear", 50, 0.001, 0.2)
    process = D.GaussianDiffusion(betas)
    generator = torch.Generator().manual_seed(2)
    x0 = torch.full((200_000, 1), 0.8, dtype=torch.float64)
    x = x0
    for beta in betas.tolist():
        x = D.q_step_sample(x, torch.randn(x.shape, dtype=torch.float64, generator=generator), beta)
    alpha_bar = process.alphas_cumprod[-1].item()
    assert x.mean().item() == pytest.approx(math.sqrt(alpha_bar) * 0.8, abs=0.01)
    assert x.var().item() == pytest.approx(1 - alpha_bar, abs=0.01)
    mean, variance = process.q_mean_variance(x0[:2], torch.tensor([49, 49]))
    assert mean[0].item() == pytest.approx(math.sqrt(alpha_bar) * 0.8, rel=1e-12)
    assert variance.flatten()[0].item() == pytest.approx(1 - alpha_bar, rel=1e-12)


def test_normal_kl_matches_torch_distributions():
    generator = torch.Generator().manual_seed(3)
    m1, m2 = torch.randn(2, 100, dtype=torch.float64, generator=generator)
    lv1, lv2 = torch.randn(2, 100, dtype=torch.float64, generator=generator)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    torch.testing.assert_close(D.normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-12)


def test_discretized_likelihood_is_a_distribution_over_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, -1.0), (0.93, -4.0), (-1.2, 0.5)]:
        log_p = D.discretized_gaussian_log_likelihood(
            bins, torch.full_like(bins, mean), torch.full_like(bins, log_scale)
        )
        assert log_p.exp().sum().item() == pytest.approx(1.0, abs=1e-6)


def test_prior_kl_by_hand():
    betas = make_betas("linear", 1000)
    process = D.GaussianDiffusion(betas)
    x0 = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)[-1].item()
    by_hand = np.mean([0.5 * (-1 - math.log(1 - alpha_bar) + (1 - alpha_bar) + alpha_bar * x**2) for x in (0.5, -1.0)])
    assert process.prior_kl(x0).item() == pytest.approx(by_hand, rel=1e-10)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_snr_decreases_and_zero_snr_reaches_zero(schedule):
    betas = make_betas(schedule, 1000, beta_start=0.0001, beta_end=0.02)
    snr = D.snr(torch.cumprod(1 - betas, 0))
    assert bool((snr[1:] < snr[:-1]).all())
    rescaled = torch.cumprod(1 - make_betas(schedule, 1000, rescale_betas_zero_snr=True), 0)
    assert rescaled[-1].item() == 0.0
    assert bool((rescaled[1:] < rescaled[:-1]).all())
    # the first ᾱ is kept by the rescaling (Lin et al. 2023, Algorithm 1)
    assert rescaled[0].item() == pytest.approx(torch.cumprod(1 - betas, 0)[0].item(), rel=1e-12)


def test_scale_with_timesteps_keeps_the_ddpm_range_at_t1000():
    torch.testing.assert_close(make_betas("linear", 1000, scale_with_timesteps=True), make_betas("linear", 1000))
    scaled = make_betas("linear", 100, scale_with_timesteps=True)
    assert scaled[0].item() == pytest.approx(0.001) and scaled[-1].item() == pytest.approx(0.2)


def test_respacing_keeps_alpha_bar_of_chosen_steps():
    process = D.GaussianDiffusion(make_betas("squaredcos_cap_v2", 1000))
    respaced = process.respace([999, 500, 250, 0])
    torch.testing.assert_close(respaced.alphas_cumprod, process.alphas_cumprod[[0, 250, 500, 999]])
    torch.testing.assert_close(torch.cumprod(1 - respaced.betas, 0), respaced.alphas_cumprod)


def test_ddim_eta_one_over_all_steps_equals_ddpm_fixed_small():
    """With η = 1 and every step, DDIM's σ_t² is β̃_t and its mean is μ̃_t: it is DDPM's ancestral step."""
    ddpm = DDPMPosteriorScheduler(variance_type="fixed_small", clip_sample=False)
    ddim = DDIMPosteriorScheduler(clip_sample=False)
    ddpm.set_timesteps(1000)
    ddim.set_timesteps(1000)
    generator = torch.Generator().manual_seed(4)
    x_ddpm = x_ddim = torch.randn(2, 1, 4, 4, dtype=torch.float64, generator=generator)
    for t in ddpm.timesteps.tolist():
        noise = torch.randn(x_ddpm.shape, dtype=torch.float64, generator=generator)
        eps_ddpm, eps_ddim = torch.tanh(x_ddpm) * 0.5, torch.tanh(x_ddim) * 0.5  # any smooth "network"
        x_ddpm = ddpm.step(eps_ddpm, t, x_ddpm, variance_noise=noise).prev_sample
        x_ddim = ddim.step(eps_ddim, t, x_ddim, eta=1.0, variance_noise=noise if t > 0 else None).prev_sample
    torch.testing.assert_close(x_ddim, x_ddpm, rtol=0, atol=1e-9)
