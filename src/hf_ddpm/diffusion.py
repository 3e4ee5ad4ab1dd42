"""The Gaussian diffusion process of Ho et al. 2020 over one β schedule: every formula of the theory, once.

The free functions take ᾱ values (`alpha_bar`, a python float or a float64 tensor broadcastable to the data,
e.g. [N, 1, 1, 1]) and compute their coefficients in float64 before casting them to the data's dtype, so that
1 - ᾱ near ᾱ = 1 keeps its precision. `GaussianDiffusion` holds the float64 tables of one schedule and indexes them
per sample; the schedulers, the losses and the evaluation all call into this module.

Equation numbers: "Ho" is Ho et al. 2020 (DDPM), "Song" is Song et al. 2021 (DDIM, ICLR), "Nichol" is Nichol &
Dhariwal 2021 (improved DDPM), "Salimans" is Salimans & Ho 2022 (v-prediction), "SDE" is Song et al. 2021 (ICLR,
score SDEs), "Bao" is Bao et al. 2022 (Analytic-DPM, ICLR).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

# The likelihood terms live in `likelihood.py`; all five names stay importable from here (re-exported).
from .likelihood import (
    approx_standard_normal_cdf,  # noqa: F401
    discretized_gaussian_log_likelihood,
    gaussian_log_likelihood,
    nats_to_bits_per_dim,  # noqa: F401
    normal_kl,
)

Coef = float | torch.Tensor
PredictionType = Literal["epsilon", "sample", "v_prediction"]
VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")

# ᾱ = 0 (zero terminal SNR) makes x0 from ε a division by zero; this floor keeps it finite (and then clipped).
ALPHA_BAR_FLOOR = 1e-20
# β̃ is 0 at the last sampling step; its log is floored like diffusers' clamp, for learned_range interpolation.
VARIANCE_FLOOR = 1e-20


def _sqrt(value: Coef) -> Coef:
    return value.sqrt() if torch.is_tensor(value) else math.sqrt(value)


def _log(value: Coef) -> Coef:
    return value.log() if torch.is_tensor(value) else math.log(value)


def _floor(value: Coef, floor: float) -> Coef:
    return value.clamp(min=floor) if torch.is_tensor(value) else max(value, floor)


def _clip(value: Coef, low: float, high: Coef) -> Coef:
    """value clipped to [low, high], elementwise when either is a tensor."""
    if torch.is_tensor(value) or torch.is_tensor(high):
        value = torch.as_tensor(value, dtype=torch.float64).clamp(min=low)
        return torch.minimum(value, torch.as_tensor(high, dtype=torch.float64, device=value.device))
    return min(max(value, low), high)


def _cast(coef: Coef, like: torch.Tensor) -> Coef:
    return coef.to(device=like.device, dtype=like.dtype) if torch.is_tensor(coef) else coef


def lincomb(a: Coef, x: torch.Tensor, b: Coef, y: torch.Tensor) -> torch.Tensor:
    """a·x + b·y, with float64 coefficients cast to x's dtype; two fused kernels instead of three (one if a is 1)."""
    a, b = _cast(a, x), _cast(b, x)
    ax = x if not torch.is_tensor(a) and a == 1 else a * x
    if torch.is_tensor(b):
        return torch.addcmul(ax, b, y)
    return torch.add(ax, y, alpha=b)


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: [N, ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


# --- the forward process -------------------------------------------------------------------------------------------


def q_sample(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: Coef) -> torch.Tensor:
    """Sample q(x_t | x_0) = N(√ᾱ_t x_0, (1 - ᾱ_t) I) with the given ε (eq. 4, Ho). x0, noise: [N, ...]."""
    return lincomb(_sqrt(alpha_bar), x0, _sqrt(1 - alpha_bar), noise)


def q_step_sample(x_prev: torch.Tensor, noise: torch.Tensor, beta: Coef) -> torch.Tensor:
    """Sample q(x_t | x_{t-1}) = N(√(1 - β_t) x_{t-1}, β_t I) (eq. 2, Ho)."""
    return lincomb(_sqrt(1 - beta), x_prev, _sqrt(beta), noise)


def step_beta(alpha_bar_t: Coef, alpha_bar_prev: Coef) -> Coef:
    """β of the step prev -> t: 1 - ᾱ_t / ᾱ_prev (equals β_t for adjacent steps, the respaced β otherwise)."""
    return 1 - alpha_bar_t / alpha_bar_prev


def snr(alpha_bar: Coef) -> Coef:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t) (Kingma et al. 2021, eq. 2 in VP form)."""
    return alpha_bar / (1 - alpha_bar)


# --- the posterior q(x_{t-1} | x_t, x_0) ---------------------------------------------------------------------------


def posterior_mean_coefficients(alpha_bar_t: Coef, alpha_bar_prev: Coef) -> tuple[Coef, Coef]:
    """The coefficients of x_0 and x_t in μ̃_t (eq. 7, Ho), for any pair of steps prev < t."""
    beta = step_beta(alpha_bar_t, alpha_bar_prev)
    coef_x0 = _sqrt(alpha_bar_prev) * beta / (1 - alpha_bar_t)
    coef_xt = _sqrt(1 - beta) * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    return coef_x0, coef_xt


def posterior_variance(alpha_bar_t: Coef, alpha_bar_prev: Coef) -> Coef:
    """β̃_t = (1 - ᾱ_{t-1}) / (1 - ᾱ_t) · β_t (eq. 7, Ho)."""
    return (1 - alpha_bar_prev) / (1 - alpha_bar_t) * step_beta(alpha_bar_t, alpha_bar_prev)


def posterior_mean(x0: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: Coef, alpha_bar_prev: Coef) -> torch.Tensor:
    """μ̃_t(x_t, x_0) (eq. 7, Ho). x0, x_t: [N, ...]."""
    coef_x0, coef_xt = posterior_mean_coefficients(alpha_bar_t, alpha_bar_prev)
    return lincomb(coef_x0, x0, coef_xt, x_t)


def posterior_mean_from_eps(
    x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: Coef, alpha_bar_prev: Coef
) -> torch.Tensor:
    """μ̃_t written with ε: (x_t - β_t / √(1 - ᾱ_t) · ε) / √α_t (eq. 11, Ho)."""
    beta = step_beta(alpha_bar_t, alpha_bar_prev)
    scale = 1 / _sqrt(1 - beta)
    return lincomb(scale, x_t, -scale * beta / _sqrt(1 - alpha_bar_t), eps)


# --- ε <-> x0 <-> v ------------------------------------------------------------------------------------------------


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: Coef) -> torch.Tensor:
    """x_0 = (x_t - √(1 - ᾱ_t) ε) / √ᾱ_t, eq. 4 of Ho solved for x_0 (as in eq. 15)."""
    alpha_bar_safe = _floor(alpha_bar, ALPHA_BAR_FLOOR)
    return lincomb(1 / _sqrt(alpha_bar_safe), x_t, -_sqrt((1 - alpha_bar) / alpha_bar_safe), eps)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: Coef) -> torch.Tensor:
    """ε = (x_t - √ᾱ_t x_0) / √(1 - ᾱ_t), eq. 4 of Ho solved for ε."""
    inv_std = 1 / _sqrt(1 - alpha_bar)
    return lincomb(inv_std, x_t, -_sqrt(alpha_bar) * inv_std, x0)


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: Coef) -> torch.Tensor:
    """v = √ᾱ_t ε - √(1 - ᾱ_t) x_0 (Salimans, section 4)."""
    return lincomb(_sqrt(alpha_bar), eps, -_sqrt(1 - alpha_bar), x0)


def x0_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: Coef) -> torch.Tensor:
    """x_0 = √ᾱ_t x_t - √(1 - ᾱ_t) v (Salimans, section 4)."""
    return lincomb(_sqrt(alpha_bar), x_t, -_sqrt(1 - alpha_bar), v)


def eps_from_v(x_t: torch.Tensor, v: torch.Tensor, alpha_bar: Coef) -> torch.Tensor:
    """ε = √ᾱ_t v + √(1 - ᾱ_t) x_t (Salimans, section 4)."""
    return lincomb(_sqrt(alpha_bar), v, _sqrt(1 - alpha_bar), x_t)


def check_prediction_type(prediction_type: str) -> None:
    """Raise a ValueError naming `prediction_type` unless it is one of PREDICTION_TYPES."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"Unknown prediction_type {prediction_type!r}; allowed: {', '.join(PREDICTION_TYPES)}.")


def model_output_to_x0(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: Coef, prediction_type: str
) -> torch.Tensor:
    """The model's x_0 estimate from its output of the given prediction type."""
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, model_output, alpha_bar)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return x0_from_v(x_t, model_output, alpha_bar)
    check_prediction_type(prediction_type)
    raise AssertionError  # unreachable: check_prediction_type raised


def model_output_to_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: Coef, prediction_type: str
) -> torch.Tensor:
    """The model's ε estimate from its output of the given prediction type."""
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return eps_from_x0(x_t, model_output, alpha_bar)
    if prediction_type == "v_prediction":
        return eps_from_v(x_t, model_output, alpha_bar)
    check_prediction_type(prediction_type)
    raise AssertionError


def split_model_output(
    model_output: torch.Tensor, channels: int, variance_type: str | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[N, C or 2C, ...] -> the prediction [N, C, ...] and the learned variance values [N, C, ...] or None.

    A learned `variance_type` needs the 2C output; a fixed one drops the variance half (None: keep what is there)."""
    learned = variance_type in LEARNED_VARIANCE_TYPES
    if learned and model_output.shape[1] != 2 * channels:
        raise ValueError(
            f"variance_type {variance_type!r} needs a model output with 2×{channels} channels, "
            f"got {model_output.shape[1]}."
        )
    if model_output.shape[1] == 2 * channels:
        prediction, var_values = model_output[:, :channels], model_output[:, channels:]
        return prediction, var_values if learned or variance_type is None else None
    if model_output.shape[1] != channels:
        raise ValueError(
            f"model output has {model_output.shape[1]} channels; expected {channels} or {2 * channels} (learned "
            f"variance) for data with {channels} channels."
        )
    return model_output, None


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: Coef, prediction_type: str) -> torch.Tensor:
    """What a network of the given prediction type is regressed onto for x_t = q_sample(x0, noise)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return v_from_x0_eps(x0, noise, alpha_bar)
    check_prediction_type(prediction_type)
    raise AssertionError


# --- reverse steps ---------------------------------------------------------------------------------------------------


def ddim_sigma(alpha_bar_t: Coef, alpha_bar_prev: Coef, eta: float) -> Coef:
    """σ_t(η) = η √β̃_t of the pair (eq. 16, Song); η = 1 is DDPM's posterior noise, η = 0 deterministic."""
    return eta * _sqrt(posterior_variance(alpha_bar_t, alpha_bar_prev))


def ddim_step(
    x0: torch.Tensor, eps: torch.Tensor, alpha_bar_prev: Coef, sigma: Coef = 0.0, noise: torch.Tensor | None = None
) -> torch.Tensor:
    """x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 - ᾱ_{t-1} - σ²) ε̂ + σ z (eq. 12, Song).

    With σ = 0 and ᾱ_{t-1} replaced by a larger-t ᾱ this is also the DDIM inversion step.
    """
    direction = _sqrt(_floor(1 - alpha_bar_prev - sigma**2, 0.0))
    out = lincomb(_sqrt(alpha_bar_prev), x0, direction, eps)
    if noise is not None:
        out = lincomb(1.0, out, sigma, noise)
    return out


def analytic_variance(
    alpha_bar_t: Coef, alpha_bar_prev: Coef, lambda2: Coef, gamma: Coef, data_half_range: float | None = None
) -> Coef:
    """The optimal reverse variance σ*² of the step t -> prev (Bao, Theorem 1), clipped to its bounds (Theorem 2).

    σ*² = λ² + (√(β̄_t / α) - √(β̄_prev - λ²))² (1 - Γ_t), where β̄ = 1 - ᾱ, α = ᾱ_t / ᾱ_prev is the step's own ratio
    (the respaced α of the paper's section 4), λ² the noise of the reverse family q_λ(x_prev | x_t, x_0) whose mean
    the sampler uses (λ² = β̃: DDPM; λ² = η² β̃: DDIM) and Γ_t = E‖ε_θ(x_t, t)‖² / d (`hf_ddpm.calibrate`).
    (β̄_t / ᾱ_t)(1 - Γ_t) estimates E Cov[x_0 | x_t] / d; Theorem 2 bounds it by [0, β̄_t / ᾱ_t] (1 - Γ in [0, 1],
    so λ² ≤ σ*² ≤ λ² + (…)²) and, for data in [-r, r]^d, by r² (`data_half_range` r; None: unbounded data).
    Arguments: floats or float64 tensors that broadcast (e.g. [K]); the result is float64 of their shape.
    """
    alpha_bar_t_safe = _floor(alpha_bar_t, ALPHA_BAR_FLOOR)
    gap = _sqrt((1 - alpha_bar_t) * alpha_bar_prev / alpha_bar_t_safe) - _sqrt(
        _floor(1 - alpha_bar_prev - lambda2, 0.0)
    )
    one_minus_gamma = _clip(1 - gamma, 0.0, 1.0)
    if data_half_range is not None:  # Cov[x_0 | x_t] / d ≤ r² for data in [-r, r]
        cov_bound = data_half_range**2 * alpha_bar_t_safe / _floor(1 - alpha_bar_t, ALPHA_BAR_FLOOR)
        one_minus_gamma = _clip(one_minus_gamma, 0.0, cov_bound)
    return lambda2 + gap**2 * one_minus_gamma


def pixel_noise_variance_bound(pixels: float, num_bins: int = 256, data_half_range: float = 1.0) -> float:
    """The largest σ² whose noise σz stays within `pixels` quantization bins on average: E|σz| = σ √(2/π) ≤ y Δ with
    Δ = 2r / (num_bins - 1), i.e. σ² ≤ (y Δ √(π/2))². Bao et al. clip the last noisy step's σ*² by it when sampling
    8-bit images (their Appendix; y = 1 or 2), since an overestimated σ there shows as visible noise in the output.
    """
    return (pixels * 2 * data_half_range / (num_bins - 1) * math.sqrt(math.pi / 2)) ** 2


def langevin_step_size(score: torch.Tensor, noise: torch.Tensor, alpha: Coef, snr_ratio: float) -> torch.Tensor:
    """ε_i = 2 α_i (r ‖z‖ / ‖s‖)², per sample (Algorithm 5, SDE): the step that keeps the given noise-to-score ratio.

    score, noise: [N, ...] -> [N, 1, ...].
    """
    flat = (score.shape[0], -1)
    ratio = noise.reshape(flat).norm(dim=1) / score.reshape(flat).norm(dim=1).clamp(min=1e-12)
    return (2 * alpha * (snr_ratio * ratio) ** 2).reshape(-1, *([1] * (score.ndim - 1)))


def langevin_correct(
    x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: Coef, alpha: Coef, snr_ratio: float, noise: torch.Tensor
) -> torch.Tensor:
    """One Langevin corrector step at fixed t (Algorithm 5, SDE, VP form).

    The score of q(x_t) is -ε / √(1 - ᾱ_t); x ← x + ε_i s + √(2 ε_i) z.
    """
    score = eps * (-1 / _sqrt(1 - alpha_bar))
    step = langevin_step_size(score, noise, alpha, snr_ratio).to(x_t.dtype)
    return x_t + step * score + (2 * step).sqrt() * noise


# --- one process over one schedule -----------------------------------------------------------------------------------


class GaussianDiffusion:
    """The forward process and its posterior over one schedule, with every table in float64.

    Built from betas ([T]) or, via `from_alphas_cumprod`, from the ᾱ of any increasing set of steps (respacing).
    Methods take per-sample step indices `t: LongTensor [N]` into this process's tables and data `[N, C, H, W]`
    (any trailing shape works).
    """

    def __init__(self, betas: torch.Tensor | Sequence[float], final_alpha_cumprod: float = 1.0):
        betas = torch.as_tensor(np.asarray(betas, dtype=np.float64))
        self._init_tables(torch.cumprod(1.0 - betas, dim=0), final_alpha_cumprod)

    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: torch.Tensor, final_alpha_cumprod: float = 1.0) -> GaussianDiffusion:
        """A process whose steps have the given ᾱ (decreasing, [T']); ᾱ before the first step is `final`."""
        process = cls.__new__(cls)
        process._init_tables(torch.as_tensor(alphas_cumprod, dtype=torch.float64), final_alpha_cumprod)
        return process

    def _init_tables(self, alphas_cumprod: torch.Tensor, final_alpha_cumprod: float) -> None:
        self.alphas_cumprod = alphas_cumprod
        self.alphas_cumprod_prev = torch.cat([alphas_cumprod.new_tensor([final_alpha_cumprod]), alphas_cumprod[:-1]])
        self.betas = step_beta(self.alphas_cumprod, self.alphas_cumprod_prev)
        self.num_timesteps = int(alphas_cumprod.shape[0])
        self.posterior_variance = posterior_variance(self.alphas_cumprod, self.alphas_cumprod_prev)
        # β̃_0 = 0; like the DDPM code, its log takes β̃_1 so that log-space terms stay finite.
        clipped = self.posterior_variance.clone()
        if self.num_timesteps > 1:
            clipped[0] = self.posterior_variance[1]
        self.posterior_log_variance_clipped = torch.log(clipped.clamp(min=VARIANCE_FLOOR))
        self.posterior_mean_coef1, self.posterior_mean_coef2 = posterior_mean_coefficients(
            self.alphas_cumprod, self.alphas_cumprod_prev
        )

    def respace(self, timesteps: Sequence[int] | torch.Tensor, final_alpha_cumprod: float = 1.0) -> GaussianDiffusion:
        """The process restricted to `timesteps` (any order, unique): its β are 1 - ᾱ_{t_i} / ᾱ_{t_{i-1}}.

        Respacing is composition: the new process keeps this one's ᾱ at the chosen steps (Nichol, section 4).
        """
        chosen = torch.as_tensor(sorted(int(t) for t in timesteps), dtype=torch.long)
        process = GaussianDiffusion.from_alphas_cumprod(self.alphas_cumprod[chosen], final_alpha_cumprod)
        process.timestep_map = chosen
        return process

    def _at(self, table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as float64 of shape [N, 1, ..., 1] broadcastable to `like`; cast happens in `lincomb`."""
        values = self._on_device(table, t.device)[t]
        return values.reshape(-1, *([1] * (like.ndim - 1)))

    def _on_device(self, table: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`table` on `device`, copied once per device: a blocking host-to-GPU copy at every call would make the
        host wait for the GPU (twice per training step: in `add_noise` and in the loss)."""
        if table.device == device:
            return table
        cache = self.__dict__.setdefault("_device_tables", {})
        key = (id(table), device)
        hit = cache.get(key)
        if hit is None or hit[0] is not table:  # `is`: a replaced table may reuse a freed one's id
            hit = cache[key] = (table, table.to(device))
        return hit[1]

    def alpha_bar(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t per sample, float64 [N, 1, ..., 1]."""
        return self._at(self.alphas_cumprod, t, like)

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) per sample, float64 [N]."""
        return snr(self.alphas_cumprod.to(t.device)[t])

    def q_mean_variance(self, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean [N, ...] and variance [N, 1, ...] of q(x_t | x_0) (eq. 4, Ho)."""
        alpha_bar = self.alpha_bar(t, x0)
        return _cast(_sqrt(alpha_bar), x0) * x0, _cast(1 - alpha_bar, x0)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) for per-sample t (eq. 4, Ho)."""
        return q_sample(x0, noise, self.alpha_bar(t, x0))

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """μ̃_t [N, ...], β̃_t and clipped log β̃_t ([N, 1, ...]) of q(x_{t-1} | x_t, x_0) (eqs. 6-7, Ho)."""
        mean = posterior_mean(x0, x_t, self.alpha_bar(t, x_t), self._at(self.alphas_cumprod_prev, t, x_t))
        variance = _cast(self._at(self.posterior_variance, t, x_t), x_t)
        log_variance = _cast(self._at(self.posterior_log_variance_clipped, t, x_t), x_t)
        return mean, variance, log_variance

    def analytic_variance(
        self, gamma: torch.Tensor, eta: float = 1.0, data_half_range: float | None = None
    ) -> torch.Tensor:
        """σ*² of every step of this process, float64 [T'] (`analytic_variance`, Bao, Theorem 1-2).

        gamma: Γ at this process's steps, [T']; the family's λ² = η² β̃ (η = 1: the DDPM posterior noise).
        """
        gamma = torch.as_tensor(gamma, dtype=torch.float64)
        lambda2 = eta**2 * self.posterior_variance
        return analytic_variance(self.alphas_cumprod, self.alphas_cumprod_prev, lambda2, gamma, data_half_range)

    def model_log_variance(
        self, t: torch.Tensor, variance_type: str, like: torch.Tensor, var_values: torch.Tensor | None = None
    ) -> torch.Tensor:
        """log σ_t² of p(x_{t-1} | x_t) for each variance type (section 3.2, Ho; eq. 15, Nichol).

        fixed_small: β̃_t; fixed_large: β_t (with β̃_1 at t = 0, as the DDPM code, so L_0 stays a sharp decoder);
        learned: the network outputs σ² itself (diffusers' convention); learned_range: the network outputs
        v ∈ [-1, 1] and log σ² = (v+1)/2 · log β_t + (1-v)/2 · log β̃_t.
        """
        check_variance_type(variance_type)
        if variance_type in ("fixed_small", "fixed_small_log"):
            return _cast(self._at(self.posterior_log_variance_clipped, t, like), like).expand_as(like)
        log_beta = torch.log(self.betas.clamp(min=VARIANCE_FLOOR))
        if variance_type in ("fixed_large", "fixed_large_log"):
            large = log_beta.clone()
            large[0] = self.posterior_log_variance_clipped[0]
            return _cast(self._at(large, t, like), like).expand_as(like)
        if var_values is None:
            raise ValueError(f"variance_type {variance_type!r} needs the network's variance output (var_values).")
        if variance_type == "learned":
            return torch.log(var_values.clamp(min=VARIANCE_FLOOR))
        frac = (var_values + 1) / 2
        min_log = _cast(self._at(self.posterior_log_variance_clipped, t, like), like)
        max_log = _cast(self._at(log_beta, t, like), like)
        return frac * max_log + (1 - frac) * min_log

    def p_mean_variance(
        self,
        model_output: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        clip_denoised: bool = False,
    ) -> dict[str, torch.Tensor]:
        """The reverse step p(x_{t-1} | x_t): mean, log variance and the x_0 estimate (eq. 1 and 11, Ho).

        model_output: [N, C, ...], or [N, 2C, ...] for learned variance types (the second half is the variance).
        """
        model_output, var_values = split_model_output(model_output, x_t.shape[1], variance_type)
        alpha_bar = self.alpha_bar(t, x_t)
        pred_x0 = model_output_to_x0(model_output, x_t, alpha_bar, prediction_type)
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1, 1)
        mean = posterior_mean(pred_x0, x_t, alpha_bar, self._at(self.alphas_cumprod_prev, t, x_t))
        log_variance = self.model_log_variance(t, variance_type, x_t, var_values)
        return {"mean": mean, "log_variance": log_variance, "pred_x0": pred_x0}

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """L_T = KL(q(x_T | x_0) ‖ N(0, I)) in nats per dimension, [N] (eq. 5, Ho)."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, dtype=torch.long, device=x0.device)
        mean, variance = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, torch.log(variance), torch.zeros_like(mean), 0.0))

    def vlb_term(
        self,
        x0: torch.Tensor,
        x_t: torch.Tensor,
        t: torch.Tensor,
        model_mean: torch.Tensor,
        model_log_variance: torch.Tensor,
        decoder: Literal["discretized", "gaussian"] = "discretized",
    ) -> torch.Tensor:
        """L_{t-1} = KL(q(x_{t-1}|x_t,x_0) ‖ p(x_{t-1}|x_t)) for t > 0 and L_0 = -log p(x_0|x_1) at t = 0 (eq. 5, Ho).

        In nats per dimension, [N]. `decoder` picks the 8-bit discretized decoder (images) or a continuous Gaussian.
        """
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x0, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, model_mean, model_log_variance))
        log_scales = 0.5 * model_log_variance
        if decoder == "discretized":
            log_likelihood = discretized_gaussian_log_likelihood(x0, model_mean, log_scales)
        elif decoder == "gaussian":
            log_likelihood = gaussian_log_likelihood(x0, model_mean, log_scales)
        else:
            raise ValueError(f"Unknown decoder {decoder!r}; allowed: 'discretized', 'gaussian'.")
        return torch.where(t == 0, -mean_flat(log_likelihood), kl)


def check_variance_type(variance_type: str) -> None:
    """Raise a ValueError naming `variance_type` unless it is one of VARIANCE_TYPES."""
    if variance_type not in VARIANCE_TYPES:
        raise ValueError(f"Unknown variance_type {variance_type!r}; allowed: {', '.join(VARIANCE_TYPES)}.")
