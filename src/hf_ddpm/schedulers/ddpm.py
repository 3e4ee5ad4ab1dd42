"""DDPM ancestral sampling from the exact posterior q(x_{t-1} | x_t, x_0) (Ho et al. 2020, Algorithm 2)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from ..diffusion import (
    LEARNED_VARIANCE_TYPES,
    check_variance_type,
    langevin_correct,
    model_output_to_eps,
    model_output_to_x0,
    posterior_mean,
    split_model_output,
)
from ..validation import check_int
from .base import COMPATIBLE_SCHEDULERS, PosteriorSchedulerBase, PosteriorSchedulerOutput


class DDPMPosteriorScheduler(PosteriorSchedulerBase):
    """Ancestral sampling x_{t-1} ~ N(μ̃_t(x_t, x̂_0), σ_t²) over the chosen (possibly respaced) steps.

    Config keys are diffusers' `DDPMScheduler` keys, so configs load both ways with `from_config`; new keys:

    Args:
        scale_betas_with_timesteps: multiply beta_start/beta_end by 1000/T, as the DDPM code does, so that a
            different T keeps the same continuous process.
        corrector_steps: Langevin corrector steps per timestep (Song et al. 2021, predictor-corrector); 0 is off.
            The pipeline runs them, since each needs a network evaluation (`langevin_step`).
        corrector_snr: the corrector's signal-to-noise ratio r, which sets its step size.
        analytic_variance: sample with the optimal reverse variance σ*² of each (respaced) step instead of
            `variance_type`'s fixed one (Bao et al. 2022, Analytic-DPM; `diffusion.analytic_variance` with λ² = β̃).
            Needs `analytic_gamma`.
        analytic_gamma: the model's calibration, Γ_t = E‖ε_θ(x_t, t)‖²/d for every training timestep ([T] floats),
            written by `python -m hf_ddpm.calibrate`; saved with the config, so it travels with the model.
        analytic_noise_clip_pixels: with analytic variance, clip the last noisy step's σ* so that its noise moves a
            pixel by at most this many 8-bit levels on average (Bao et al. use 1-2 for image samples); None: off.

    `variance_type`: fixed_small (β̃_t), fixed_large (β_t), their `_log` forms (the same distribution, computed in
    log space), learned (the network's second half is σ²) and learned_range (it interpolates log β̃_t and log β_t of
    the respaced step; Nichol & Dhariwal 2021, eq. 15).
    """

    _compatibles = COMPATIBLE_SCHEDULERS

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        scale_betas_with_timesteps: bool = False,
        corrector_steps: int = 0,
        corrector_snr: float = 0.16,
        analytic_variance: bool = False,
        analytic_gamma: list[float] | None = None,
        analytic_noise_clip_pixels: float | None = None,
    ):
        check_variance_type(variance_type)
        if analytic_variance and variance_type in LEARNED_VARIANCE_TYPES:
            raise ValueError(
                f"analytic_variance replaces a fixed variance; it cannot be combined with the learned "
                f"variance_type {variance_type!r} (allowed: fixed_small, fixed_small_log, fixed_large, fixed_large_log)."
            )
        check_int("corrector_steps", corrector_steps, 0)
        if not corrector_snr > 0:
            raise ValueError(f"corrector_snr must be > 0, got {corrector_snr!r}.")
        self.variance_type = variance_type
        self._build()

    def _use_timesteps(self, timesteps: np.ndarray, device: str | torch.device | None) -> None:
        super()._use_timesteps(timesteps, device)
        if self.config.variance_type not in LEARNED_VARIANCE_TYPES:
            positions = torch.arange(self.sampling_diffusion.num_timesteps)
            like = torch.zeros(len(positions), 1, dtype=torch.float64)
            log_variance = self.sampling_diffusion.model_log_variance(positions, self.config.variance_type, like)
            self._std = torch.exp(0.5 * log_variance).flatten().tolist()

    def _noise_std(self, position: int, var_values: torch.Tensor | None, like: torch.Tensor) -> float | torch.Tensor:
        if self.config.analytic_variance:
            return self._analytic_noise_std(position)
        if self.config.variance_type not in LEARNED_VARIANCE_TYPES:
            return self._std[position]
        t = torch.full((like.shape[0],), position, dtype=torch.long, device=like.device)
        log_variance = self.sampling_diffusion.model_log_variance(t, self.config.variance_type, like, var_values)
        return torch.exp(0.5 * log_variance)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        variance_noise: torch.Tensor | None = None,
    ) -> PosteriorSchedulerOutput | tuple:
        """One ancestral step x_t -> x_{t-1} (Algorithm 2 of Ho et al., with x̂_0 from any prediction type).

        Args:
            model_output: the network output [N, C, H, W], or [N, 2C, H, W] with a learned variance.
            timestep: the current timestep t (an entry of `self.timesteps`).
            sample: x_t, [N, C, H, W].
            generator: for the posterior noise; ignored when `variance_noise` is given.
            variance_noise: the noise z itself, [N, C, H, W] (no noise is added at the last step).
        """
        position = self._step_position(timestep)
        model_output, var_values = split_model_output(model_output, sample.shape[1], self.config.variance_type)
        alpha_bar, alpha_bar_prev = self._alpha_bar[position], self._alpha_bar_prev[position]
        pred_x0 = self._postprocess_x0(
            model_output_to_x0(model_output, sample, alpha_bar, self.config.prediction_type)
        )
        prev_sample = posterior_mean(pred_x0, sample, alpha_bar, alpha_bar_prev)
        if position > 0:  # the last step returns the posterior mean, as Algorithm 2 does
            if variance_noise is None:
                variance_noise = randn_tensor(
                    model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
                )
            std = self._noise_std(position, var_values, sample)
            if torch.is_tensor(std):
                prev_sample = torch.addcmul(prev_sample, std, variance_noise)
            else:
                prev_sample = prev_sample.add_(variance_noise, alpha=std)
        if not return_dict:
            return prev_sample, pred_x0
        return PosteriorSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_x0)

    def langevin_step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One Langevin corrector step at timestep t, keeping x_t distributed as q(x_t) (Song et al. 2021, Alg. 5).

        `model_output` is the network's output at (sample, t); returns the corrected x_t, [N, C, H, W].
        """
        t = int(timestep)
        if not 0 <= t < self.config.num_train_timesteps:
            raise ValueError(f"timestep must lie in [0, {self.config.num_train_timesteps - 1}], got {t}.")
        model_output, _ = split_model_output(model_output, sample.shape[1])
        alpha_bar = float(self.diffusion.alphas_cumprod[t])
        eps = model_output_to_eps(model_output, sample, alpha_bar, self.config.prediction_type)
        if noise is None:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        alpha = 1.0 - float(self.diffusion.betas[t])
        return langevin_correct(sample, eps, alpha_bar, alpha, self.config.corrector_snr, noise)
