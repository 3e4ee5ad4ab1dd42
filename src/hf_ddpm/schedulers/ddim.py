"""DDIM sampling and inversion (Song et al. 2021): the non-Markovian process with the DDPM marginals."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from ..diffusion import (
    ddim_sigma,
    ddim_step,
    eps_from_x0,
    model_output_to_eps,
    model_output_to_x0,
    split_model_output,
    x0_from_eps,
)
from .base import COMPATIBLE_SCHEDULERS, PosteriorSchedulerBase, PosteriorSchedulerOutput


def check_eta(eta: float) -> None:
    """η interpolates between DDIM (0) and the DDPM posterior noise (1); anything else is rejected."""
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must lie in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}.")


class DDIMPosteriorScheduler(PosteriorSchedulerBase):
    """DDIM: x_{t-1} = √ᾱ_{t-1} x̂_0 + √(1 - ᾱ_{t-1} - σ_t²) ε̂ + σ_t z with σ_t = η √β̃_t (eq. 12 and 16, Song).

    The previous timestep of each step is the next entry of `timesteps` for every spacing (diffusers uses
    `t - T // N`, which is off the list for `linspace` and for `trailing` when N does not divide T).
    `inverse_step` runs the deterministic (η = 0) map the other way, x_0 -> x_T.

    Config keys are diffusers' `DDIMScheduler` keys; new keys (see the DDPM scheduler): `scale_betas_with_timesteps`,
    and `analytic_variance` / `analytic_gamma` / `analytic_noise_clip_pixels`: with analytic variance the mean stays
    DDIM's for the given η (direction √(1 - ᾱ_{t-1} - η² β̃) ε̂) and the noise is the optimal σ*² of that η family
    (Bao et al. 2022, Theorem 1 with λ² = η² β̃), so it adds noise even at η = 0, as their Analytic-DDIM does.
    """

    _compatibles = COMPATIBLE_SCHEDULERS
    _final_alpha_cumprod_from_config = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        scale_betas_with_timesteps: bool = False,
        analytic_variance: bool = False,
        analytic_gamma: list[float] | None = None,
        analytic_noise_clip_pixels: float | None = None,
    ):
        self._build()

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> PosteriorSchedulerOutput | tuple:
        """One DDIM step x_t -> x_{t-1}.

        Args:
            model_output: the network output, [N, C, H, W] (a learned-variance half is ignored).
            timestep: the current timestep t (an entry of `self.timesteps`).
            sample: x_t, [N, C, H, W].
            eta: η ∈ [0, 1].
            use_clipped_model_output: recompute ε̂ from the clipped x̂_0, as the DDIM code does.
            generator / variance_noise: the source of z when η > 0, or with analytic variance (give one, not both).
        """
        check_eta(eta)
        if variance_noise is not None and generator is not None:
            raise ValueError("Pass either generator or variance_noise, not both.")
        position = self._step_position(timestep)
        model_output, _ = split_model_output(model_output, sample.shape[1])
        alpha_bar, alpha_bar_prev = self._alpha_bar[position], self._alpha_bar_prev[position]
        prediction_type = self.config.prediction_type
        pred_x0 = model_output_to_x0(model_output, sample, alpha_bar, prediction_type)
        pred_eps = model_output_to_eps(model_output, sample, alpha_bar, prediction_type)
        pred_x0 = self._postprocess_x0(pred_x0)
        if use_clipped_model_output:
            pred_eps = eps_from_x0(sample, pred_x0, alpha_bar)
        sigma = ddim_sigma(alpha_bar, alpha_bar_prev, eta)
        noise_std = self._analytic_noise_std(position, eta) if self.config.analytic_variance else sigma
        noise = None
        if (noise_std > 0) if self.config.analytic_variance else (eta > 0):  # diffusers draws z whenever η > 0
            noise = variance_noise
            if noise is None:
                noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
        prev_sample = ddim_step(pred_x0, pred_eps, alpha_bar_prev, sigma)
        if noise is not None:
            prev_sample = prev_sample.add_(noise, alpha=noise_std)
        if not return_dict:
            return prev_sample, pred_x0
        return PosteriorSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_x0)

    def inverse_step(
        self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor, return_dict: bool = True
    ) -> PosteriorSchedulerOutput | tuple:
        """One DDIM inversion step: from `sample` at the step before `timestep` (x_0 for the first) to x_timestep.

        Walk `reversed(self.timesteps)`, with `model_output` the network's output at (sample, timestep) — the
        usual approximation ε̂(x_{t-1}) ≈ ε̂(x_t) of DDIM inversion (Song et al. 2021, section 4.3).
        """
        position = self._step_position(timestep)
        model_output, _ = split_model_output(model_output, sample.shape[1])
        alpha_bar_to, alpha_bar_from = self._alpha_bar[position], self._alpha_bar_prev[position]
        pred_eps = model_output_to_eps(model_output, sample, alpha_bar_to, self.config.prediction_type)
        pred_x0 = x0_from_eps(sample, pred_eps, alpha_bar_from)
        next_sample = ddim_step(pred_x0, pred_eps, alpha_bar_to)
        if not return_dict:
            return next_sample, pred_x0
        return PosteriorSchedulerOutput(prev_sample=next_sample, pred_original_sample=pred_x0)
