"""The optimal reverse variance of Analytic-DPM (Bao et al. 2022): the σ*² formula against an independent float64
reference, its bounds, and on the Gaussian oracle (exact ε-model, closed-form Γ) the samplers' output law and the
K-step variational bound. The sampler biases without analytic variance are those of tests/test_oracle.py."""

import math

import pytest
import torch
from helpers import MEAN, STD, GaussianOracle

from hf_ddpm import diffusion as D
from hf_ddpm.evaluation import respaced_bits_per_dim
from hf_ddpm.schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler

SHAPE = (48, 1, 16, 16)  # 12,288 scalars: the sample variance has a relative standard error of 1.3%


def closed_form_gamma(alphas_cumprod: torch.Tensor) -> list[float]:
    """Γ_t for x_0 ~ N(m, s²) under the exact model: ε̂ = √(1-ᾱ)(x_t - √ᾱ m)/v with Var x_t = v = ᾱ s² + 1 - ᾱ, so
    E ε̂² = (1 - ᾱ)/v."""
    return ((1 - alphas_cumprod) / (alphas_cumprod * STD**2 + 1 - alphas_cumprod)).tolist()


def reference_sigma2(ab_t: float, ab_s: float, lambda2: float, gamma: float, half_range: float | None) -> float:
    """σ*² written in the other form of Bao et al. (their code's): λ² + c · clip(E Cov[x_0|x_t]/d), with
    E Cov[x_0|x_t]/d = (1 - ᾱ_t)/ᾱ_t · (1 - Γ) clipped to [0, r²] and to [0, (1 - ᾱ_t)/ᾱ_t] (i.e. Γ ∈ [0, 1]),
    and c = (√ᾱ_s - √((1 - ᾱ_s - λ²) ᾱ_t / (1 - ᾱ_t)))²: the squared x_0-coefficient of the family's mean."""
    cov = (1 - ab_t) / ab_t * min(max(1 - gamma, 0.0), 1.0)
    if half_range is not None:
        cov = min(cov, half_range**2)
    coef = (math.sqrt(ab_s) - math.sqrt((1 - ab_s - lambda2) * ab_t / (1 - ab_t))) ** 2
    return lambda2 + coef * cov


def exact_output_moments(scheduler, steps: int, eta: float, analytic: bool) -> tuple[float, float]:
    """Mean and variance of the sampler's output on the oracle, propagated exactly in float64 (every step is
    affine in x plus Gaussian noise), independently of hf_ddpm's step code: DDPM x' = c₀ x̂_0 + c₁ x + σ z (eq. 7,
    Ho), DDIM x' = √ᾱ' x̂_0 + √(1 - ᾱ' - λ²) ε̂ + σ z (eq. 12, Song), λ² = η² β̃; σ² = λ² or `reference_sigma2`."""
    scheduler.set_timesteps(steps)
    ab = scheduler.diffusion.alphas_cumprod.tolist()
    timesteps = scheduler.timesteps.tolist()
    gamma = closed_form_gamma(scheduler.diffusion.alphas_cumprod)
    mean, var = 0.0, 1.0
    for i, t in enumerate(timesteps):
        ab_t, ab_s = ab[t], (ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0)
        v = ab_t * STD**2 + 1 - ab_t
        gain_x0, gain_eps = math.sqrt(ab_t) * STD**2 / v, math.sqrt(1 - ab_t) / v  # d x̂_0 / dx, d ε̂ / dx
        centered = mean - math.sqrt(ab_t) * MEAN
        lambda2 = eta**2 * (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
        if i + 1 == len(timesteps):
            sigma2 = 0.0
        else:
            sigma2 = reference_sigma2(ab_t, ab_s, lambda2, gamma[t], None) if analytic else lambda2
        if isinstance(scheduler, DDIMPosteriorScheduler):
            direction = math.sqrt(1 - ab_s - lambda2)
            gain = math.sqrt(ab_s) * gain_x0 + direction * gain_eps
            mean = math.sqrt(ab_s) * (MEAN + gain_x0 * centered) + direction * gain_eps * centered
        else:
            beta = 1 - ab_t / ab_s
            c0, c1 = math.sqrt(ab_s) * beta / (1 - ab_t), math.sqrt(1 - beta) * (1 - ab_s) / (1 - ab_t)
            gain = c0 * gain_x0 + c1
            mean = c0 * (MEAN + gain_x0 * centered) + c1 * mean
        var = gain**2 * var + sigma2
    return mean, var


def sample(scheduler, steps: int, **step_kwargs) -> torch.Tensor:
    oracle = GaussianOracle(scheduler.diffusion.alphas_cumprod)
    generator = torch.Generator().manual_seed(0)
    scheduler.set_timesteps(steps)
    x = torch.randn(SHAPE, dtype=torch.float64, generator=generator)
    for t in scheduler.timesteps.tolist():
        x = scheduler.step(oracle(x, t), t, x, generator=generator, **step_kwargs).prev_sample
    return x


def analytic(cls, **config):
    gamma = closed_form_gamma(cls().diffusion.alphas_cumprod)
    return cls(clip_sample=False, analytic_variance=True, analytic_gamma=gamma, **config)


# --- the formula ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("half_range", [None, 1.0, 0.05])
def test_sigma2_matches_an_independent_float64_reference_and_its_bounds(half_range):
    generator = torch.Generator().manual_seed(0)
    ab_s = torch.rand(200, generator=generator, dtype=torch.float64) * 0.98 + 0.01
    ab_t = ab_s * (torch.rand(200, generator=generator, dtype=torch.float64) * 0.98 + 0.01)
    gamma = torch.rand(200, generator=generator, dtype=torch.float64) * 1.4 - 0.2  # also outside [0, 1]: clipped
    for eta in (0.0, 0.3, 1.0):
        lambda2 = eta**2 * D.posterior_variance(ab_t, ab_s)
        got = D.analytic_variance(ab_t, ab_s, lambda2, gamma, half_range)
        expected = [reference_sigma2(*map(float, args), half_range) for args in zip(ab_t, ab_s, lambda2, gamma)]
        torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-15)
        # Theorem 2: λ² ≤ σ*² ≤ λ² + (√(β̄_t/α) - √(β̄_s - λ²))²
        upper = lambda2 + ((1 - ab_t) * ab_s / ab_t).sqrt().sub((1 - ab_s - lambda2).sqrt()) ** 2
        assert (got >= lambda2).all() and (got <= upper * (1 + 1e-12)).all()
        # the same on python floats (the DDIM step's path)
        i = 7
        scalar = D.analytic_variance(float(ab_t[i]), float(ab_s[i]), float(lambda2[i]), float(gamma[i]), half_range)
        assert scalar == pytest.approx(expected[i], rel=1e-12)


def test_pixel_bound_keeps_the_mean_absolute_noise_at_the_given_levels():
    sigma = math.sqrt(D.pixel_noise_variance_bound(2.0))
    assert sigma * math.sqrt(2 / math.pi) == pytest.approx(2 * 2 / 255, rel=1e-12)  # E|σz| = 2 levels of 2/255


def test_scheduler_variances_are_the_formula_on_the_respaced_steps():
    scheduler = analytic(DDPMPosteriorScheduler)
    scheduler.set_timesteps(10)
    process = scheduler.sampling_diffusion
    gamma = closed_form_gamma(scheduler.diffusion.alphas_cumprod)
    for position in range(1, 10):
        ab_t, ab_s = float(process.alphas_cumprod[position]), float(process.alphas_cumprod_prev[position])
        lambda2 = (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)
        t = int(process.timestep_map[position])
        expected = reference_sigma2(ab_t, ab_s, lambda2, gamma[t], None)
        assert scheduler._analytic_noise_std(position) ** 2 == pytest.approx(expected, rel=1e-12)
    assert scheduler._analytic_noise_std(0) == 0.0  # the last step returns the mean, as Algorithm 2


def test_clip_sample_range_bounds_the_posterior_covariance():
    """clip_sample asserts data in [-r, r]: Theorem 2's bound Cov[x_0|x_t]/d ≤ r² applies (here r = 0.05 binds)."""
    gamma = closed_form_gamma(DDIMPosteriorScheduler().diffusion.alphas_cumprod)
    scheduler = DDIMPosteriorScheduler(clip_sample_range=0.05, analytic_variance=True, analytic_gamma=gamma)
    scheduler.set_timesteps(10)
    process = scheduler.sampling_diffusion
    for position in range(1, 10):
        ab_t, ab_s = float(process.alphas_cumprod[position]), float(process.alphas_cumprod_prev[position])
        expected = reference_sigma2(ab_t, ab_s, 0.0, gamma[int(process.timestep_map[position])], 0.05)
        assert scheduler._analytic_noise_std(position, 0.0) ** 2 == pytest.approx(expected, rel=1e-12)
    unbounded = reference_sigma2(ab_t, ab_s, 0.0, gamma[int(process.timestep_map[9])], None)
    assert scheduler._analytic_noise_std(9, 0.0) ** 2 < unbounded


def test_pixel_clip_applies_to_the_last_noisy_step_only():
    plain, clipped = analytic(DDPMPosteriorScheduler), analytic(DDPMPosteriorScheduler, analytic_noise_clip_pixels=0.5)
    for scheduler in (plain, clipped):
        scheduler.set_timesteps(10)
    bound = D.pixel_noise_variance_bound(0.5)
    assert plain._analytic_noise_std(1) ** 2 > bound  # so that the clip has something to do
    assert clipped._analytic_noise_std(1) ** 2 == pytest.approx(bound)
    assert [clipped._analytic_noise_std(k) for k in range(2, 10)] == [
        plain._analytic_noise_std(k) for k in range(2, 10)
    ]


# --- sampling on the oracle -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "steps", "eta", "fixed_bias"),
    [
        (DDPMPosteriorScheduler, 100, 1.0, -0.124),  # README "Accuracy on a known answer"
        (DDPMPosteriorScheduler, 10, 1.0, -0.55),
        (DDIMPosteriorScheduler, 50, 0.0, -0.10),
        (DDIMPosteriorScheduler, 50, 1.0, -0.21),
        (DDIMPosteriorScheduler, 10, 0.0, -0.44),
    ],
)
def test_analytic_variance_removes_the_few_step_variance_bias(cls, steps, eta, fixed_bias):
    """The exact output law of each sampler: with the fixed variance it underestimates s² by `fixed_bias`, with the
    analytic variance it is within ±3% (and the samples follow that law within their sampling error)."""
    kwargs = {"eta": eta} if cls is DDIMPosteriorScheduler else {}
    _, fixed_var = exact_output_moments(cls(clip_sample=False), steps, eta, analytic=False)
    assert (fixed_var - STD**2) / STD**2 == pytest.approx(fixed_bias, abs=0.01)
    scheduler = analytic(cls)
    mean, var = exact_output_moments(scheduler, steps, eta, analytic=True)
    assert abs(var - STD**2) / STD**2 < 0.03 and abs(mean - MEAN) < 2e-3
    x = sample(scheduler, steps, **kwargs)
    n = x.numel()
    assert x.mean().item() == pytest.approx(mean, abs=4 * math.sqrt(var / n))
    assert x.var().item() == pytest.approx(var, abs=4 * var * math.sqrt(2 / n))


def test_analytic_ddim_adds_noise_even_at_eta_zero():
    scheduler = analytic(DDIMPosteriorScheduler)
    scheduler.set_timesteps(10)
    t = int(scheduler.timesteps[0])
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    eps = GaussianOracle(scheduler.diffusion.alphas_cumprod)(x, t)
    a = scheduler.step(eps, t, x, eta=0.0, generator=torch.Generator().manual_seed(1)).prev_sample
    b = scheduler.step(eps, t, x, eta=0.0, generator=torch.Generator().manual_seed(2)).prev_sample
    assert not torch.equal(a, b)


# --- configuration --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [DDPMPosteriorScheduler, DDIMPosteriorScheduler])
def test_analytic_variance_without_calibration_names_the_calibrate_command(cls):
    with pytest.raises(ValueError, match=r"python -m hf_ddpm\.calibrate --model DIR"):
        cls(analytic_variance=True)
    with pytest.raises(ValueError, match="python -m hf_ddpm.calibrate"):
        cls.from_config(cls().config, analytic_variance=True)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"analytic_gamma": [0.5] * 10}, r"analytic_gamma must hold 1000 finite values >= 0.*shape \(10,\)"),
        ({"analytic_gamma": [float("nan")] * 1000}, "analytic_gamma must hold 1000 finite values"),
        ({"analytic_gamma": [-0.1] * 1000}, "analytic_gamma must hold 1000 finite values >= 0"),
        ({"analytic_noise_clip_pixels": 0}, "analytic_noise_clip_pixels must be > 0 or None"),
    ],
)
def test_bad_analytic_config_is_rejected(overrides, message):
    with pytest.raises(ValueError, match=message):
        DDIMPosteriorScheduler(**overrides)


def test_learned_variance_and_analytic_variance_are_exclusive():
    with pytest.raises(ValueError, match="cannot be combined with the learned variance_type 'learned_range'"):
        DDPMPosteriorScheduler(variance_type="learned_range", analytic_variance=True, analytic_gamma=[0.5] * 1000)


def test_calibration_survives_a_swap_between_schedulers():
    ddpm = analytic(DDPMPosteriorScheduler)
    ddim = DDIMPosteriorScheduler.from_config(ddpm.config)
    assert ddim.config.analytic_variance and list(ddim.config.analytic_gamma) == list(ddpm.config.analytic_gamma)


# --- the K-step variational bound -----------------------------------------------------------------------------------


def test_k_step_bound_with_analytic_variance_is_between_the_exact_nll_and_the_fixed_bound():
    """Bao et al.'s NLL against K on the oracle: for each K the analytic bound is ≤ the fixed-variance one (same
    noise draws) and ≥ the exact NLL of the same data within its Monte Carlo error (with the exact model and σ*²
    every reverse step is the true one, so the analytic bound is the NLL up to the prior and decoder terms)."""
    process = DDPMPosteriorScheduler().diffusion
    oracle = GaussianOracle(process.alphas_cumprod)
    x0 = MEAN + STD * torch.randn(20000, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    exact_nll = (0.5 * math.log(2 * math.pi * STD**2) + 0.5 * ((x0 - MEAN) / STD) ** 2).flatten() / math.log(2)
    gamma = closed_form_gamma(process.alphas_cumprod)
    kwargs = dict(decoder="gaussian", clip_denoised=False)
    fixed_excess = []
    for K in (10, 25, 100):
        timesteps = [round(t) for t in torch.linspace(0, 999, K, dtype=torch.float64).tolist()]
        fixed = respaced_bits_per_dim(oracle, process, x0, timesteps, generator=torch.manual_seed(6), **kwargs)
        best = respaced_bits_per_dim(
            oracle, process, x0, timesteps, analytic_gamma=gamma, data_half_range=None,
            generator=torch.manual_seed(6), **kwargs,
        )  # fmt: skip
        assert best.terms.shape == (K,) and torch.isfinite(best.total).all()
        assert best.mean < fixed.mean
        above_exact = best.total - exact_nll
        assert above_exact.mean() > -3 * above_exact.std() / math.sqrt(len(above_exact)), K
        fixed_excess.append(fixed.mean - exact_nll.mean().item())
    assert fixed_excess == sorted(fixed_excess, reverse=True)
