"""The likelihood terms of the variational bound (Ho et al. 2020, eq. 5): Gaussian KL, the discretized Gaussian
decoder for 8-bit images, a continuous Gaussian decoder, and nats -> bits/dim. Elementwise tensor math; the per-t
terms over a schedule are `GaussianDiffusion.prior_kl` / `vlb_term` in `diffusion.py`, which re-exports these names.
"""

from __future__ import annotations

import math

import torch

Coef = float | torch.Tensor


def normal_kl(mean1: torch.Tensor, logvar1: Coef, mean2: torch.Tensor, logvar2: Coef) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    logvar1 = torch.as_tensor(logvar1, dtype=mean1.dtype, device=mean1.device)
    logvar2 = torch.as_tensor(logvar2, dtype=mean1.dtype, device=mean1.device)
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Φ(x) by the tanh approximation used in the DDPM code (Page 1977); accurate to ~1e-4."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor, num_bins: int = 256
) -> torch.Tensor:
    """log p(x) of data in [-1, 1] quantized to `num_bins` levels under N(means, e^{2 log_scales}) (section 3.3, Ho).

    The edge bins take the whole tail, so the probabilities of all bins sum to one. All inputs: [N, ...] -> [N, ...]
    in nats.
    """
    half_bin = 1.0 / (num_bins - 1)
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + half_bin))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - half_bin))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    edge = 1.0 - 1e-3  # the outermost bins of data in [-1, 1] sit at ±1
    return torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_min, log_cdf_delta))


def gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Continuous log N(x; means, e^{2 log_scales}) elementwise, in nats (a decoder for continuous data)."""
    return -0.5 * math.log(2 * math.pi) - log_scales - 0.5 * ((x - means) * torch.exp(-log_scales)) ** 2


def nats_to_bits_per_dim(nats_per_dim: torch.Tensor) -> torch.Tensor:
    """Convert a mean negative log-likelihood in nats per dimension to bits per dimension."""
    return nats_per_dim / math.log(2.0)
