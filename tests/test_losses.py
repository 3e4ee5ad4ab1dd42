"""Tests for hf_ddpm.losses: min-SNR weights against their formula, L_simple targets, the VLB term, L_hybrid's
stop-gradient, and the loss/variance configuration checks."""

from __future__ import annotations

import pytest
import torch

from hf_ddpm.diffusion import GaussianDiffusion, q_sample, training_target
from hf_ddpm.losses import (
    HYBRID_VLB_WEIGHT,
    check_loss_config,
    min_snr_weight,
    simple_loss,
    training_losses,
    vlb_loss,
)
from hf_ddpm.schedules import make_betas

T = 100


@pytest.fixture(scope="module")
def diffusion() -> GaussianDiffusion:
    return GaussianDiffusion(make_betas("linear", T, 1e-4 * 10, 0.02 * 10))


def batch(n: int = 6, channels: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(n, channels, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(n, channels, 4, 4, generator=g)
    t = torch.linspace(0, T - 1, n).long()
    return x0, noise, t


# --- min-SNR-γ ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_weight_matches_the_formula(gamma: float) -> None:
    snr = torch.tensor([1e-4, 0.3, 1.0, 4.999, 5.0, 7.5, 1e4], dtype=torch.float64)
    for prediction_type, expected in [
        ("epsilon", [min(s, gamma) / s for s in snr.tolist()]),
        ("v_prediction", [min(s, gamma) / (s + 1) for s in snr.tolist()]),
        ("sample", [min(s, gamma) for s in snr.tolist()]),
    ]:
        weight = min_snr_weight(snr, gamma, prediction_type)
        torch.testing.assert_close(weight, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=0)


def test_min_snr_weight_for_epsilon_is_finite_at_zero_snr() -> None:
    """Zero terminal SNR: min(SNR, γ) / SNR -> 1 as SNR -> 0."""
    assert min_snr_weight(torch.tensor([0.0]), 5.0, "epsilon").item() == 1.0


def test_min_snr_weight_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="gamma must be > 0"):
        min_snr_weight(torch.ones(1), 0.0, "epsilon")
    with pytest.raises(ValueError, match="Unknown prediction_type 'x0'"):
        min_snr_weight(torch.ones(1), 5.0, "x0")


# --- L_simple --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_simple_loss_is_the_mse_to_the_target(diffusion: GaussianDiffusion, prediction_type: str) -> None:
    x0, noise, t = batch()
    alpha_bar = diffusion.alpha_bar(t, x0)
    target = training_target(x0, noise, alpha_bar, prediction_type)
    assert simple_loss(target, x0, noise, alpha_bar, prediction_type).abs().max() < 1e-6
    output = torch.zeros_like(x0)
    expected = (target**2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(simple_loss(output, x0, noise, alpha_bar, prediction_type), expected)
    # With a learned variance the second half of the output is not part of L_simple.
    learned = torch.cat([output, torch.randn_like(output)], dim=1)
    torch.testing.assert_close(simple_loss(learned, x0, noise, alpha_bar, prediction_type), expected)


def test_snr_weighting_multiplies_the_simple_term(diffusion: GaussianDiffusion) -> None:
    x0, noise, t = batch()
    x_t = q_sample(x0, noise, diffusion.alpha_bar(t, x0))
    output = torch.randn_like(x0)
    plain = training_losses(diffusion, output, x0, noise, x_t, t, "v_prediction")
    weighted = training_losses(diffusion, output, x0, noise, x_t, t, "v_prediction", snr_gamma=5.0)
    weight = min_snr_weight(diffusion.snr(t), 5.0, "v_prediction").float()
    torch.testing.assert_close(weighted.loss, plain.mse * weight)


# --- L_vlb and L_hybrid ----------------------------------------------------------------------------------------------


def test_vlb_of_the_true_posterior_is_zero(diffusion: GaussianDiffusion) -> None:
    """ε̂ = ε and learned_range v = -1 (log σ² = log β̃_t) give p = q(x_{t-1}|x_t,x_0): every KL term vanishes."""
    x0, noise, t = batch()
    t = t.clamp(min=1)
    x_t = q_sample(x0, noise, diffusion.alpha_bar(t, x0))
    output = torch.cat([noise, -torch.ones_like(noise)], dim=1)
    vlb = vlb_loss(diffusion, output, x0, x_t, t, "epsilon", "learned_range")
    assert vlb.shape == (x0.shape[0],)
    assert vlb.abs().max() < 1e-4
    # A wrong mean costs bits.
    assert (vlb_loss(diffusion, output + 0.5, x0, x_t, t, "epsilon", "learned_range") > 1e-3).all()


def test_vlb_at_t0_is_the_decoder_nll(diffusion: GaussianDiffusion) -> None:
    x0, noise, _ = batch()
    t = torch.zeros(x0.shape[0], dtype=torch.long)
    x_t = q_sample(x0, noise, diffusion.alpha_bar(t, x0))
    output = torch.cat([noise, torch.zeros_like(noise)], dim=1)
    out = diffusion.p_mean_variance(output, x_t, t, "epsilon", "learned_range")
    nats = diffusion.vlb_term(x0, x_t, t, out["mean"], out["log_variance"])
    torch.testing.assert_close(vlb_loss(diffusion, output, x0, x_t, t), nats / torch.log(torch.tensor(2.0)))


def test_hybrid_is_simple_plus_weighted_vlb_and_stops_the_mean_gradient(diffusion: GaussianDiffusion) -> None:
    x0, noise, t = batch()
    x_t = q_sample(x0, noise, diffusion.alpha_bar(t, x0))
    output = torch.randn(x0.shape[0], 2 * x0.shape[1], 4, 4, requires_grad=True)
    terms = training_losses(diffusion, output, x0, noise, x_t, t, "epsilon", "learned_range", "hybrid")
    torch.testing.assert_close(terms.loss, terms.mse + HYBRID_VLB_WEIGHT * T * terms.vlb)
    (grad_hybrid,) = torch.autograd.grad(terms.loss.sum(), output)
    mse_only = training_losses(diffusion, output, x0, noise, x_t, t, "epsilon", "learned_range", "hybrid").mse
    (grad_mse,) = torch.autograd.grad(mse_only.sum(), output)
    c = x0.shape[1]
    # The prediction half learns from L_simple only; the variance half from the VLB only.
    torch.testing.assert_close(grad_hybrid[:, :c], grad_mse[:, :c])
    assert grad_mse[:, c:].abs().max() == 0 and grad_hybrid[:, c:].abs().max() > 0
    # L_vlb alone trains the mean too.
    vlb_terms = training_losses(diffusion, output, x0, noise, x_t, t, "epsilon", "learned_range", "vlb")
    (grad_vlb,) = torch.autograd.grad(vlb_terms.loss.sum(), output)
    assert grad_vlb[:, :c].abs().max() > 0


# --- configuration checks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["hybrid", "vlb"])
def test_bound_losses_need_a_learned_variance(diffusion: GaussianDiffusion, loss_type: str) -> None:
    with pytest.raises(ValueError, match="needs a learned-variance U-Net.*'learned' or 'learned_range'"):
        check_loss_config(loss_type, "fixed_small", learned_variance=False)
    with pytest.raises(ValueError, match="needs a learned-variance U-Net"):
        check_loss_config(loss_type, "learned_range", learned_variance=False)
    x0, noise, t = batch()
    with pytest.raises(ValueError, match="needs a learned-variance U-Net"):
        training_losses(diffusion, torch.zeros_like(x0), x0, noise, x0, t, "epsilon", "fixed_small", loss_type)


def test_other_config_errors() -> None:
    with pytest.raises(ValueError, match="never trains the variance"):
        check_loss_config("simple", "learned_range", learned_variance=True)
    with pytest.raises(ValueError, match="disagree"):
        check_loss_config("simple", "fixed_small", learned_variance=True)
    with pytest.raises(ValueError, match="Unknown loss_type 'kl'"):
        check_loss_config("kl", "fixed_small", learned_variance=False)
    with pytest.raises(ValueError, match="has none; use 'hybrid'"):
        check_loss_config("vlb", "learned", learned_variance=True, snr_gamma=5.0)
    check_loss_config("hybrid", "learned", learned_variance=True, snr_gamma=5.0)
