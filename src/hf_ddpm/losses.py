"""Training objectives over `diffusion.py`: L_simple, L_vlb, L_hybrid and min-SNR-γ weighting.

* L_simple (Ho et al. 2020, eq. 14): the mean squared error between the network output and its regression target
  for the prediction type (ε, x_0 or v; `diffusion.training_target`).
* L_vlb (Ho, eq. 5): the per-timestep variational bound term L_{t-1} (a KL, or the decoder NLL at t = 0) from
  `GaussianDiffusion.vlb_term`, in bits per dimension as improved-diffusion reports it.
* L_hybrid = L_simple + λ L_vlb with λ = 0.001 and a stop-gradient on the predicted mean inside L_vlb, so the bound
  trains only the variance (Nichol & Dhariwal 2021, section 3.1, https://arxiv.org/abs/2102.09672). With t drawn
  uniformly, L_vlb = Σ_t L_t is estimated by T · L_t, so λ L_vlb = (T / 1000) · L_t — improved-diffusion's
  "rescaled" form.
* min-SNR-γ (Hang et al. 2023, https://arxiv.org/abs/2303.09556) reweights L_simple per timestep.

Every tensor here is computed in float32 or wider whatever the network's dtype (mixed precision casts the output).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .diffusion import (
    LEARNED_VARIANCE_TYPES,
    GaussianDiffusion,
    check_prediction_type,
    mean_flat,
    nats_to_bits_per_dim,
    split_model_output,
    training_target,
)

LossType = Literal["simple", "hybrid", "vlb"]
LOSS_TYPES = ("simple", "hybrid", "vlb")
# λ of L_hybrid (Nichol & Dhariwal 2021, section 3.1).
HYBRID_VLB_WEIGHT = 0.001


def check_loss_config(
    loss_type: str, variance_type: str, learned_variance: bool, snr_gamma: float | None = None
) -> None:
    """Raise a ValueError unless the loss, the scheduler's variance type and the U-Net's output agree.

    The bound terms train Σ_θ, so hybrid/vlb need a learned variance type *and* a U-Net that outputs it
    (`learned_variance=True`, 2C channels); conversely a learned variance trained by L_simple alone would stay
    untrained, so it needs hybrid or vlb.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"Unknown loss_type {loss_type!r}; allowed: {', '.join(LOSS_TYPES)}.")
    learned_type = variance_type in LEARNED_VARIANCE_TYPES
    if loss_type in ("hybrid", "vlb") and not (learned_type and learned_variance):
        raise ValueError(
            f"loss_type {loss_type!r} trains the variance through the VLB, so it needs a learned-variance U-Net "
            f"(learned_variance=True) and variance_type 'learned' or 'learned_range'; got variance_type "
            f"{variance_type!r} and learned_variance={learned_variance}."
        )
    if learned_type != learned_variance:
        raise ValueError(
            f"variance_type {variance_type!r} and learned_variance={learned_variance} disagree: a learned variance "
            "type needs a U-Net with learned_variance=True (2C output channels), and a fixed one needs False."
        )
    if learned_type and loss_type == "simple":
        raise ValueError(
            f"variance_type {variance_type!r} is learned, but loss_type 'simple' never trains the variance; "
            "use loss_type 'hybrid' (Nichol & Dhariwal 2021) or 'vlb'."
        )
    if snr_gamma is not None:
        if not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0 (5 is the paper's choice), got {snr_gamma!r}.")
        if loss_type == "vlb":
            raise ValueError("snr_gamma weights the L_simple term, and loss_type 'vlb' has none; use 'hybrid'.")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Per-sample min-SNR-γ loss weight (Hang et al. 2023, eq. 10 and Table 1): `snr: [N] -> [N]`.

    The target weight on the x_0 error is min(SNR, γ); expressed for each regression target this is
    min(SNR, γ) / SNR for ε, min(SNR, γ) / (SNR + 1) for v and min(SNR, γ) for x_0. For ε the ratio is written
    as min(1, γ / SNR), which is the same number and stays finite at SNR = 0 (zero terminal SNR).
    """
    check_prediction_type(prediction_type)
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma!r}.")
    clipped = snr.clamp(max=gamma)
    if prediction_type == "epsilon":
        return torch.where(snr > gamma, gamma / snr, torch.ones_like(snr))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def simple_loss(
    model_output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    alpha_bar: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """L_simple per sample, [N]: the MSE between the prediction (first C output channels) and its target.

    x0, noise: [N, C, H, W] (x_t = q_sample(x0, noise)); alpha_bar: ᾱ_t as [N, 1, 1, 1] float64.
    """
    prediction, _ = split_model_output(model_output, x0.shape[1])
    target = training_target(x0.float(), noise.float(), alpha_bar, prediction_type)
    return mean_flat((prediction.float() - target) ** 2)


def vlb_loss(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prediction_type: str = "epsilon",
    variance_type: str = "learned_range",
    stop_gradient_mean: bool = False,
) -> torch.Tensor:
    """The VLB term L_{t-1} per sample in bits per dimension, [N] (an unbiased estimate of L_vlb / T).

    model_output: [N, 2C, H, W] (prediction, then variance values); x0, x_t: [N, C, H, W]; t: [N] indices into
    `diffusion`. With `stop_gradient_mean` the prediction half is detached, so only the variance learns from the
    bound (L_hybrid).
    """
    prediction, var_values = split_model_output(model_output.float(), x0.shape[1])
    if var_values is None:
        raise ValueError(
            "the VLB loss needs a learned-variance U-Net output (2C channels, learned_variance=True) and "
            "variance_type 'learned' or 'learned_range'."
        )
    if stop_gradient_mean:
        prediction = prediction.detach()
    out = diffusion.p_mean_variance(
        torch.cat([prediction, var_values], dim=1), x_t.float(), t, prediction_type, variance_type
    )
    nats = diffusion.vlb_term(x0.float(), x_t.float(), t, out["mean"], out["log_variance"])
    return nats_to_bits_per_dim(nats)


@dataclass
class LossTerms:
    """Per-sample loss terms, each [N] float32: `loss` is what is minimised; `mse` (L_simple, unweighted) and
    `vlb` (L_{t-1} in bits/dim, or None) are reported."""

    loss: torch.Tensor
    mse: torch.Tensor
    vlb: torch.Tensor | None = None


def training_losses(
    diffusion: GaussianDiffusion,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    noise: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    loss_type: str = "simple",
    snr_gamma: float | None = None,
) -> LossTerms:
    """The training loss of one batch, per sample (improved-diffusion's `training_losses`).

    Args:
        diffusion: the training process (`scheduler.diffusion`); `t` indexes its tables.
        model_output: `unet(x_t, t).sample`, [N, C, H, W] or [N, 2C, H, W] with a learned variance.
        x0, noise, x_t: [N, C, H, W] with x_t = q_sample(x0, noise) at t.
        t: [N] long timesteps.
        loss_type: "simple" (L_simple), "hybrid" (L_simple + λ L_vlb, mean detached in L_vlb) or "vlb" (L_vlb).
        snr_gamma: min-SNR-γ weighting of the L_simple term; None is unweighted.
    """
    check_loss_config(loss_type, variance_type, model_output.shape[1] == 2 * x0.shape[1], snr_gamma)
    alpha_bar = diffusion.alpha_bar(t, x0)
    mse = simple_loss(model_output, x0, noise, alpha_bar, prediction_type)
    weighted = mse if snr_gamma is None else mse * min_snr_weight(diffusion.snr(t), snr_gamma, prediction_type).float()
    if loss_type == "simple":
        return LossTerms(loss=weighted, mse=mse)
    vlb = vlb_loss(
        diffusion, model_output, x0, x_t, t, prediction_type, variance_type, stop_gradient_mean=loss_type == "hybrid"
    )
    if loss_type == "vlb":
        return LossTerms(loss=vlb, mse=mse, vlb=vlb)
    return LossTerms(loss=weighted + HYBRID_VLB_WEIGHT * diffusion.num_timesteps * vlb, mse=mse, vlb=vlb)
