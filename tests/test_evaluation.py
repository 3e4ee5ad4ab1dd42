"""Bits/dim: a hand-computed case, exact vs fast mode, learned variance, and the Gaussian oracle's bound."""

import math

import numpy as np
import pytest
import torch
from helpers import MEAN, STD, GaussianOracle, oracle_variational_bound, tiny_unet

from hf_ddpm import DDPMUNet
from hf_ddpm.diffusion import GaussianDiffusion
from hf_ddpm.evaluation import bits_per_dim, dataset_bits_per_dim
from hf_ddpm.schedules import make_betas


def _tanh_cdf(x):
    return 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def test_zero_eps_model_matches_a_hand_computation():
    """ε̂ ≡ 0, T = 4, a 2×2 image: every term by hand from the schedule (fixed-small variance, clipped x̂_0)."""
    betas = np.array([0.05, 0.2, 0.4, 0.6])
    process = GaussianDiffusion(torch.tensor(betas))
    x0 = torch.tensor([[[[-1.0, -0.2], [0.4, 1.0]]]], dtype=torch.float64)
    result = bits_per_dim(lambda x, t: torch.zeros_like(x), process, x0, generator=torch.Generator().manual_seed(7))

    generator = torch.Generator().manual_seed(7)  # bits_per_dim draws the noise for t = 0, 1, 2, 3 in that order
    noises = [torch.randn(x0.shape, generator=generator, dtype=torch.float64).numpy().ravel() for _ in range(4)]
    x = x0.numpy().ravel()
    ab = np.cumprod(1 - betas)
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    tilde = (1 - ab_prev) / (1 - ab) * betas
    nats = 0.5 * np.mean(-1 - np.log(1 - ab[-1]) + (1 - ab[-1]) + ab[-1] * x**2)  # L_T
    for t in range(4):
        x_t = np.sqrt(ab[t]) * x + np.sqrt(1 - ab[t]) * noises[t]
        x0_hat = np.clip(x_t / np.sqrt(ab[t]), -1, 1)
        c0, c1 = np.sqrt(ab_prev[t]) * betas[t] / (1 - ab[t]), np.sqrt(1 - betas[t]) * (1 - ab_prev[t]) / (1 - ab[t])
        model_mean = c0 * x0_hat + c1 * x_t
        if t == 0:  # the discretized decoder, with β̃_1 as the variance (the clipped log-variance)
            std = np.sqrt(tilde[1])
            upper = np.where(x > 0.999, 1.0, _tanh_cdf((x - model_mean + 1 / 255) / std))
            lower = np.where(x < -0.999, 0.0, _tanh_cdf((x - model_mean - 1 / 255) / std))
            nats += -np.mean(np.log(upper - lower))
        else:
            true_mean = c0 * x + c1 * x_t
            nats += np.mean((true_mean - model_mean) ** 2 / (2 * tilde[t]))
    assert result.total.item() == pytest.approx(nats / math.log(2), rel=1e-9)
    assert result.stderr.item() == 0.0


def _tiny_unet(learned_variance: bool = False) -> DDPMUNet:
    return tiny_unet(conv_out_std=0.02, attention_resolutions=(), learned_variance=learned_variance)


def _images(n: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=generator).float() / 127.5 - 1


def test_exact_and_fast_modes_agree_within_the_reported_error():
    process = GaussianDiffusion(make_betas("linear", 100, scale_with_timesteps=True))
    unet, x0 = _tiny_unet(), _images()
    exact = bits_per_dim(unet, process, x0, generator=torch.Generator().manual_seed(0))
    fast = bits_per_dim(unet, process, x0, mode="fast", num_strata=10, generator=torch.Generator().manual_seed(0))
    assert exact.stderr.abs().max().item() == 0
    assert fast.mean_stderr > 0
    assert abs(fast.mean - exact.mean) < 4 * fast.mean_stderr + 1e-3
    assert torch.isfinite(exact.terms).all() and torch.isnan(fast.terms).any()
    # determinism under a seed
    again = bits_per_dim(unet, process, x0, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(again.total, exact.total, rtol=0, atol=0)


def test_learned_and_fixed_variance_both_work():
    process = GaussianDiffusion(make_betas("linear", 50, scale_with_timesteps=True))
    x0 = _images(2)
    fixed = bits_per_dim(_tiny_unet(), process, x0, variance_type="fixed_large")
    learned = bits_per_dim(_tiny_unet(learned_variance=True), process, x0, variance_type="learned_range")
    for result in (fixed, learned):
        assert torch.isfinite(result.total).all() and (result.total > 0).all()
    assert learned.mean != pytest.approx(fixed.mean)
    with pytest.raises(ValueError, match="needs a model output with 2×1 channels"):
        bits_per_dim(_tiny_unet(), process, x0, variance_type="learned_range")


def test_dataset_loop_gives_the_oracle_bound():
    """The dataset-level loop over the Gaussian oracle equals the bound of test_oracle.py (within Monte Carlo error)."""
    process = GaussianDiffusion(make_betas("linear", 100, scale_with_timesteps=True))
    oracle = GaussianOracle(process.alphas_cumprod)
    generator = torch.Generator().manual_seed(5)
    data = MEAN + STD * torch.randn(4000, 1, dtype=torch.float64, generator=generator)
    result = dataset_bits_per_dim(
        oracle, process, data.split(1000), decoder="gaussian", clip_denoised=False, variance_type="fixed_small"
    )
    nats = result.mean * math.log(2)
    standard_error = result.total.std().item() * math.log(2) / math.sqrt(len(result.total))
    # two independent Monte Carlo estimates of the same bound: within 4 combined standard errors
    assert abs(nats - oracle_variational_bound(100)) < 4 * math.sqrt(2) * standard_error
    assert nats > 0.5 * math.log(2 * math.pi * STD**2) + 0.5  # above the exact NLL


def test_bad_mode_and_empty_dataset():
    process = GaussianDiffusion(make_betas("linear", 10))
    with pytest.raises(ValueError, match="Unknown mode 'slow'"):
        bits_per_dim(lambda x, t: x, process, torch.zeros(1, 1, 2, 2), mode="slow")
    with pytest.raises(ValueError, match="no batches"):
        dataset_bits_per_dim(lambda x, t: x, process, [])
