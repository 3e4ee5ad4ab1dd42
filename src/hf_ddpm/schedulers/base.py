"""What both posterior schedulers share: config validation, the β schedule, timestep spacing, the forward process
for training (`add_noise`, `get_velocity`) and x̂_0 clipping / thresholding. The formulas live in `diffusion.py`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..diffusion import (
    GaussianDiffusion,
    check_prediction_type,
    pixel_noise_variance_bound,
    q_sample,
    v_from_x0_eps,
)
from ..loading import check_local_component
from ..schedules import diffusers_solver_keys, make_betas
from ..validation import check_int

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers' schedulers that sample our models from `from_config(ours.config)` (tests/test_diffusers_solvers.py), and
# ours: the keys they read are not reported as unexpected when their configs come back to us.
COMPATIBLE_SCHEDULERS = [
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "EulerDiscreteScheduler",
    "HeunDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "LMSDiscreteScheduler",
    "DDPMPosteriorScheduler",
    "DDIMPosteriorScheduler",
]
# The keys that define the process any scheduler samples (schedule, parametrisation, steps, x̂_0 clipping): never
# "left at the default", which from_config replaces by the target class' default (Heun's beta_start is 0.00085).
PROCESS_KEYS = (
    "num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr",
    "prediction_type", "timestep_spacing", "steps_offset", "clip_sample", "clip_sample_range", "thresholding",
    "dynamic_thresholding_ratio", "sample_max_value",
)  # fmt: skip
CALIBRATE_COMMAND = "python -m hf_ddpm.calibrate --model DIR --dataset DATASET --num_samples M"


@dataclass
class PosteriorSchedulerOutput(BaseOutput):
    """Output of a scheduler step.

    Args:
        prev_sample: x_{t-1}, [N, C, H, W].
        pred_original_sample: the model's (clipped) x̂_0, [N, C, H, W].
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def spaced_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0
) -> np.ndarray:
    """The sampling timesteps, descending, as int64 (Lin et al. 2023, Table 2 for the three spacings)."""
    T, n = num_train_timesteps, num_inference_steps
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n).round()[::-1]
    elif spacing == "leading":
        timesteps = (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    elif spacing == "trailing":
        # [:n]: for many (T, n), e.g. (1000, 61), float error gives arange n + 1 entries, the last one rounding to -1.
        timesteps = np.round(np.arange(T, 0, -T / n))[:n] - 1
    else:
        raise ValueError(f"Unknown timestep_spacing {spacing!r}; allowed: {', '.join(TIMESTEP_SPACINGS)}.")
    timesteps = timesteps.astype(np.int64).copy()
    if timesteps.max() >= T:
        raise ValueError(
            f"timestep_spacing {spacing!r} with steps_offset={steps_offset} and num_inference_steps={n} reaches "
            f"timestep {int(timesteps.max())}, but timesteps must be below num_train_timesteps={T}."
        )
    return timesteps


def _check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")


class PosteriorSchedulerBase(SchedulerMixin, ConfigMixin):
    """Base of `DDPMPosteriorScheduler` and `DDIMPosteriorScheduler`: one `GaussianDiffusion` over the configured
    β schedule, and the sampling steps chosen by `set_timesteps` as a respaced process over it."""

    order = 1
    init_noise_sigma = 1.0
    # ᾱ before the first training step: 1 for DDPM; DDIM may use ᾱ_0 instead (`set_alpha_to_one=False`).
    _final_alpha_cumprod_from_config = False

    def _build(self) -> None:
        """Validate the registered config and build the process; called at the end of each subclass' __init__."""
        # Keys diffusers' solvers read, so that `XScheduler.from_config(ours.config)` samples the same process (see
        # PROCESS_KEYS); `_class_name` (found in diffusers' namespace, see registration.py) lets from_config drop our
        # own keys quietly, as it does for a saved config.
        defaults = [key for key in self.config.get("_use_default_values", []) if key not in PROCESS_KEYS]
        solver_keys = diffusers_solver_keys(self.config)
        self.register_to_config(**solver_keys, _use_default_values=defaults, _class_name=type(self).__name__)
        config = self.config
        check_prediction_type(config.prediction_type)
        if config.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(
                f"Unknown timestep_spacing {config.timestep_spacing!r}; allowed: {', '.join(TIMESTEP_SPACINGS)}."
            )
        check_int("steps_offset", config.steps_offset, 0)
        _check_positive("clip_sample_range", config.clip_sample_range)
        _check_positive("sample_max_value", config.sample_max_value)
        if not 0 < config.dynamic_thresholding_ratio <= 1:
            raise ValueError(
                f"dynamic_thresholding_ratio must lie in (0, 1], got {config.dynamic_thresholding_ratio!r}."
            )
        trained_betas = config.trained_betas
        if callable(trained_betas):
            # A user function t -> β is evaluated once so that the saved config stays plain JSON.
            trained_betas = make_betas(trained_betas, config.num_train_timesteps).tolist()
            self.register_to_config(trained_betas=trained_betas)
        betas = make_betas(
            config.beta_schedule,
            config.num_train_timesteps,
            config.beta_start,
            config.beta_end,
            trained_betas=trained_betas,
            rescale_betas_zero_snr=config.rescale_betas_zero_snr,
            scale_with_timesteps=config.scale_betas_with_timesteps,
        )
        self.diffusion = GaussianDiffusion(betas)
        self._check_analytic_config()
        # float32 views for code written against diffusers' schedulers (training scripts read these).
        self.betas = betas.float()
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = self.diffusion.alphas_cumprod.float()
        if self._final_alpha_cumprod_from_config and not config.set_alpha_to_one:
            self.final_alpha_cumprod = float(self.diffusion.alphas_cumprod[0])
        else:
            self.final_alpha_cumprod = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._use_timesteps(np.arange(config.num_train_timesteps)[::-1].copy(), device=None)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, subfolder: str | None = None, **kwargs):
        """diffusers' `SchedulerMixin.from_pretrained`, with a clear error for a local folder missing its config."""
        if pretrained_model_name_or_path is not None:
            check_local_component(pretrained_model_name_or_path, subfolder, cls.config_name, cls.__name__)
        return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)

    # --- sampling steps ----------------------------------------------------------------------------------------------

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: list[int] | None = None,
    ) -> None:
        """Choose the sampling steps: `num_inference_steps` spaced by `timestep_spacing`, or explicit `timesteps`.

        Sampling then runs the respaced process over the chosen steps (ᾱ ratios of consecutive chosen steps), and the
        previous timestep of each step is the next entry of this list.
        """
        T = self.config.num_train_timesteps
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("Pass exactly one of num_inference_steps or timesteps.")
        if timesteps is not None:
            values = [int(t) for t in timesteps]
            if not values:
                raise ValueError("timesteps must not be empty.")
            if any(b >= a for a, b in zip(values, values[1:])):
                raise ValueError(f"timesteps must be strictly descending, got {values}.")
            if values[0] >= T or values[-1] < 0:
                raise ValueError(f"timesteps must lie in [0, {T - 1}] (num_train_timesteps={T}), got {values}.")
            self.custom_timesteps = True
            self.num_inference_steps = len(values)
            self._use_timesteps(np.asarray(values, dtype=np.int64), device)
            return
        check_int("num_inference_steps", num_inference_steps, 1, T, "(num_train_timesteps)")
        self.custom_timesteps = False
        self.num_inference_steps = int(num_inference_steps)
        spaced = spaced_timesteps(T, num_inference_steps, self.config.timestep_spacing, self.config.steps_offset)
        self._use_timesteps(spaced, device)

    def _use_timesteps(self, timesteps: np.ndarray, device: str | torch.device | None) -> None:
        self._analytic_std = {}  # η -> σ* per sampling step, for these steps
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.sampling_diffusion = self.diffusion.respace(timesteps, self.final_alpha_cumprod)
        ascending = self.sampling_diffusion.timestep_map.tolist()
        self._position = {t: k for k, t in enumerate(ascending)}
        self._previous = {t: (ascending[k - 1] if k > 0 else -1) for k, t in enumerate(ascending)}
        # Python floats: a step then costs no small-tensor arithmetic (see benchmarks/bench_schedulers.py).
        self._alpha_bar = self.sampling_diffusion.alphas_cumprod.tolist()
        self._alpha_bar_prev = self.sampling_diffusion.alphas_cumprod_prev.tolist()

    # --- analytic variance (Bao et al. 2022) -------------------------------------------------------------------------

    def _check_analytic_config(self) -> None:
        """Validate `analytic_variance` / `analytic_gamma` / `analytic_noise_clip_pixels` and keep Γ as float64 [T]."""
        config, T = self.config, self.config.num_train_timesteps
        self._gamma = None
        if config.analytic_gamma is not None:
            gamma = np.asarray(config.analytic_gamma, dtype=np.float64)
            if gamma.shape != (T,) or not np.isfinite(gamma).all() or (gamma < 0).any():
                raise ValueError(
                    f"analytic_gamma must hold {T} finite values >= 0 (Γ_t = E‖ε_θ(x_t, t)‖²/d for every training "
                    f"timestep), got shape {gamma.shape}; recompute it with `{CALIBRATE_COMMAND}`."
                )
            self._gamma = torch.from_numpy(gamma)
        pixels = config.analytic_noise_clip_pixels
        if pixels is not None and not pixels > 0:
            raise ValueError(f"analytic_noise_clip_pixels must be > 0 or None (no clipping), got {pixels!r}.")
        if config.analytic_variance and self._gamma is None:
            raise ValueError(
                "analytic_variance=True needs the model's calibration `analytic_gamma` (Γ_t for every training "
                f"timestep) in the scheduler config, and this config has none. Calibrate the model once with "
                f"`{CALIBRATE_COMMAND}` (it writes analytic_gamma into the pipeline's scheduler config)."
            )

    def _analytic_data_half_range(self) -> float | None:
        """r of data in [-r, r] for Theorem 2's bound: clipping or thresholding x̂_0 asserts it; else unbounded."""
        if self.config.clip_sample:
            return float(self.config.clip_sample_range)
        return 1.0 if self.config.thresholding else None

    def _analytic_noise_std(self, position: int, eta: float = 1.0) -> float:
        """σ* of the sampling step at `position` for the family λ² = η² β̃ (0 at the last step, which adds no noise).

        Computed for all current steps at the first call per η; the last noisy step (position 1) is also clipped to
        `analytic_noise_clip_pixels` quantization bins (Bao et al. 2022, Appendix) when that is set.
        """
        stds = self._analytic_std.get(eta)
        if stds is None:
            process = self.sampling_diffusion
            variance = process.analytic_variance(
                self._gamma[process.timestep_map], eta, self._analytic_data_half_range()
            )
            variance[0] = 0.0
            pixels = self.config.analytic_noise_clip_pixels
            if pixels is not None and len(variance) > 1:
                bound = pixel_noise_variance_bound(pixels, data_half_range=self._analytic_data_half_range() or 1.0)
                variance[1] = min(float(variance[1]), bound)
            stds = self._analytic_std[eta] = variance.sqrt().tolist()
        return stds[position]

    def _step_position(self, timestep: int | torch.Tensor) -> int:
        t = int(timestep)
        position = self._position.get(t)
        if position is None:
            raise ValueError(
                f"timestep {t} is not one of the current sampling timesteps; call set_timesteps first "
                f"(current: {self.timesteps.tolist()[:8]}{'...' if len(self.timesteps) > 8 else ''})."
            )
        return position

    def previous_timestep(self, timestep: int | torch.Tensor) -> torch.Tensor:
        """The timestep that follows `timestep` in the current sampling list (-1 after the last one)."""
        self._step_position(timestep)
        return torch.tensor(self._previous[int(timestep)])

    def scale_model_input(self, sample: torch.Tensor, timestep: int | None = None) -> torch.Tensor:
        """Identity: DDPM/DDIM feed x_t to the network unscaled (kept for diffusers' scheduler interface)."""
        return sample

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    # --- x̂_0 post-processing -----------------------------------------------------------------------------------------

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        """Dynamic thresholding (Saharia et al. 2022, section 2.3): per sample, s = the given quantile of |x̂_0|,
        clamped to [1, sample_max_value]; x̂_0 is clipped to [-s, s] and divided by s. [N, ...] -> [N, ...]."""
        if self.config.sample_max_value == 1.0:  # s = 1 for every sample: plain clipping, no quantile needed
            return sample.clamp(-1.0, 1.0)
        dtype = sample.dtype
        flat = sample.reshape(sample.shape[0], -1)
        if dtype not in (torch.float32, torch.float64):
            flat = flat.float()  # quantile needs float32/64
        s = torch.quantile(flat.abs(), self.config.dynamic_thresholding_ratio, dim=1)
        s = s.clamp(min=1, max=self.config.sample_max_value).unsqueeze(1)
        return (torch.clamp(flat, -s, s) / s).reshape(sample.shape).to(dtype)

    def _postprocess_x0(self, pred_x0: torch.Tensor) -> torch.Tensor:
        if self.config.thresholding:
            return self._threshold_sample(pred_x0)
        if self.config.clip_sample:
            return pred_x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return pred_x0

    # --- the forward process, for training -------------------------------------------------------------------------

    def _alpha_bar_at(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.diffusion.alpha_bar(timesteps.to(like.device).reshape(-1), like)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor
    ) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 - ᾱ_t) ε for per-sample training timesteps (q(x_t | x_0), eq. 4 of Ho et al.)."""
        return q_sample(original_samples, noise, self._alpha_bar_at(timesteps, original_samples))

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.IntTensor) -> torch.Tensor:
        """The v-prediction target √ᾱ_t ε - √(1 - ᾱ_t) x_0 for clean `sample` x_0."""
        return v_from_x0_eps(sample, noise, self._alpha_bar_at(timesteps, sample))
