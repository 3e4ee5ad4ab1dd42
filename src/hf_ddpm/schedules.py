"""β schedules: every schedule is returned as a float64 tensor of shape [T] with values in (0, 1].

Names follow diffusers' `beta_schedule` strings so configs move between the two libraries; `cosine` is an alias of
`squaredcos_cap_v2` (Nichol & Dhariwal 2021).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .validation import check_int

BETA_SCHEDULES = (
    "linear",
    "scaled_linear",
    "squaredcos_cap_v2",
    "cosine",
    "sigmoid",
    "quadratic",
    "constant",
    "laplace",
)

BetaFunction = Callable[[int], float]

# The schedules every diffusers scheduler builds by name (DDPM, DDIM, DPM-Solver, UniPC, DEIS, Euler, Heun, LMS), and
# the name each of ours goes by there; any other schedule reaches them as `trained_betas`.
DIFFUSERS_SCHEDULE_NAMES = {
    "linear": "linear",
    "scaled_linear": "scaled_linear",
    "quadratic": "scaled_linear",
    "squaredcos_cap_v2": "squaredcos_cap_v2",
    "cosine": "squaredcos_cap_v2",
}
# The cosine schedule's last step (β capped at 0.999) drives λ_t = log(α_t / σ_t) down to about -10, where the data
# prediction x̂_0 = (x_t - σ_t ε̂) / α_t amplifies the model's error ~10⁴-fold. DPM-Solver's author clips λ at -5.1,
# just below the linear schedule's λ_T = -5.02 (diffusers PR #3314, its `lambda_min_clipped`).
COSINE_LAMBDA_MIN_CLIPPED = -5.1


def _alpha_bar_cosine(t: float, s: float = 0.008) -> float:
    # eq. 17, Nichol & Dhariwal 2021; the offset s keeps β_0 from being vanishingly small.
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2


def _alpha_bar_laplace(t: float) -> float:
    # Hang et al. 2024 (the "laplace" schedule of diffusers): log-SNR follows a Laplace quantile.
    log_snr = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
    snr = math.exp(log_snr)
    return math.sqrt(snr / (1 + snr))


def betas_from_alpha_bar(
    alpha_bar: Callable[[float], float], num_train_timesteps: int, max_beta: float = 0.999
) -> torch.Tensor:
    """Discretize a continuous ᾱ(t), t ∈ [0, 1], into T betas: β_i = min(1 - ᾱ((i+1)/T) / ᾱ(i/T), max_beta)."""
    steps = np.arange(num_train_timesteps + 1, dtype=np.float64) / num_train_timesteps
    values = np.array([alpha_bar(float(s)) for s in steps], dtype=np.float64)
    return torch.from_numpy(np.minimum(1.0 - values[1:] / values[:-1], max_beta))


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ_t so that ᾱ_T = 0 while ᾱ_1 is kept (Lin et al. 2023, Algorithm 1).

    betas: [T] -> [T] float64; the last beta becomes exactly 1.
    """
    alphas_bar_sqrt = torch.cumprod(1.0 - betas.double(), dim=0).sqrt()
    first, last = alphas_bar_sqrt[0].clone(), alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1.0 - alphas


def _named_betas(
    schedule: str, num_train_timesteps: int, beta_start: float, beta_end: float, scale_with_timesteps: bool
) -> torch.Tensor:
    T = num_train_timesteps
    if scale_with_timesteps:
        # The DDPM code (and improved-diffusion) tie the range to T=1000 so that other T keep the same process.
        scale = 1000.0 / T
        beta_start, beta_end = scale * beta_start, scale * beta_end
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule in ("scaled_linear", "quadratic"):
        # the DDPM code's "quad": linear in √β, so β runs from beta_start to beta_end (diffusers: scaled_linear)
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "sigmoid":
        return torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (beta_end - beta_start) + beta_start
    if schedule == "constant":
        return torch.full((T,), float(beta_end), dtype=torch.float64)
    if schedule in ("squaredcos_cap_v2", "cosine"):
        return betas_from_alpha_bar(_alpha_bar_cosine, T)
    if schedule == "laplace":
        return betas_from_alpha_bar(_alpha_bar_laplace, T)
    raise ValueError(
        f"Unknown beta_schedule {schedule!r}; allowed: {', '.join(BETA_SCHEDULES)}, or a callable t -> β."
    )


def diffusers_solver_keys(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config keys to add or update so that diffusers' schedulers, given this scheduler config with plain
    `from_config`, build the same β schedule and sample it as their docs advise. Each key keeps diffusers' meaning,
    and what the config describes (β schedule, x̂_0 clipping) is unchanged:

    - our aliases become diffusers' names (`cosine` -> `squaredcos_cap_v2`, `quadratic` -> `scaled_linear`);
    - a schedule diffusers' solvers do not build (`sigmoid`, `laplace`, `constant`, or any range rescaled by
      `scale_betas_with_timesteps`) is also written as its `trained_betas` (before any zero-terminal-SNR rescale,
      which both libraries apply on top);
    - the cosine schedule gets DPM-Solver's `lambda_min_clipped` unless the config sets one (or rescales to zero
      terminal SNR, which asks for the full λ range);
    - `clip_sample` to [-1, 1] is also written as `thresholding` with `sample_max_value` 1, the same clipping
      (s = 1 for every sample) in the form DPM-Solver, UniPC and DEIS read: they have no `clip_sample`, and a model
      trained with clipping can depend on it at the noisiest steps, whose x̂_0 is ~10⁴ times the ε̂ error.
    """
    keys: dict[str, Any] = {}
    clips_to_one = config.get("clip_sample") and config.get("clip_sample_range") == 1.0
    if clips_to_one and not config.get("thresholding") and config.get("sample_max_value") == 1.0:
        keys["thresholding"] = True
    schedule, T = config["beta_schedule"], config["num_train_timesteps"]
    if config.get("trained_betas") is not None or callable(schedule):
        return keys  # diffusers reads trained_betas already
    name = DIFFUSERS_SCHEDULE_NAMES.get(schedule)
    rescaled_range = config.get("scale_betas_with_timesteps") and T != 1000 and name != "squaredcos_cap_v2"
    if name is None or rescaled_range:
        scale = bool(config.get("scale_betas_with_timesteps"))
        betas = make_betas(schedule, T, config["beta_start"], config["beta_end"], scale_with_timesteps=scale)
        keys["trained_betas"] = betas.tolist()
    elif name != schedule:
        keys["beta_schedule"] = name
    cosine = name == "squaredcos_cap_v2"
    if cosine and "lambda_min_clipped" not in config and not config.get("rescale_betas_zero_snr"):
        keys["lambda_min_clipped"] = COSINE_LAMBDA_MIN_CLIPPED
    return keys


def make_betas(
    beta_schedule: str | BetaFunction = "linear",
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    trained_betas: Sequence[float] | np.ndarray | torch.Tensor | None = None,
    rescale_betas_zero_snr: bool = False,
    scale_with_timesteps: bool = False,
) -> torch.Tensor:
    """Build the β schedule as a float64 tensor of shape [T].

    Args:
        beta_schedule: one of `BETA_SCHEDULES`, or a callable mapping a timestep index t ∈ {0..T-1} to β_t.
        num_train_timesteps: T, at least 1.
        beta_start, beta_end: the range for linear / scaled_linear / quadratic / sigmoid (constant uses beta_end).
        trained_betas: explicit betas of length T; overrides `beta_schedule`.
        rescale_betas_zero_snr: apply Lin et al. 2023's rescaling so that ᾱ_T = 0.
        scale_with_timesteps: multiply the range by 1000/T as the original DDPM code does.

    Raises:
        ValueError: naming the schedule and the offending value, for anything outside (0, 1].
    """
    check_int("num_train_timesteps", num_train_timesteps, 1)
    if trained_betas is not None:
        name = "trained_betas"
        betas = torch.as_tensor(np.asarray(trained_betas, dtype=np.float64))
        if betas.ndim != 1 or betas.numel() != num_train_timesteps:
            raise ValueError(
                f"trained_betas must be a 1-d sequence of num_train_timesteps={num_train_timesteps} values, "
                f"got shape {tuple(betas.shape)}."
            )
    elif callable(beta_schedule):
        name = getattr(beta_schedule, "__name__", "callable")
        betas = torch.tensor([float(beta_schedule(t)) for t in range(num_train_timesteps)], dtype=torch.float64)
    else:
        name = beta_schedule
        if beta_schedule in ("linear", "scaled_linear", "quadratic", "sigmoid") and beta_start > beta_end:
            raise ValueError(
                f"beta_start={beta_start} is greater than beta_end={beta_end} for beta_schedule {beta_schedule!r}; "
                "the noise level must not decrease."
            )
        betas = _named_betas(beta_schedule, num_train_timesteps, beta_start, beta_end, scale_with_timesteps)
    # 1 - β == 1 in float64 (β below ~1.1e-16) would make ᾱ = 1 and every posterior term 0 / 0.
    bad = ~((betas > 0) & (betas <= 1) & (1.0 - betas < 1.0))
    if bool(bad.any()):
        index = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"beta_schedule {name!r} gives β[{index}] = {betas[index].item()!r}; every β must lie in (0, 1] "
            "(and exceed float64's resolution, ~1.1e-16)."
        )
    zero = torch.cumprod(1.0 - betas, dim=0)[:-1] == 0
    if bool(zero.any()):
        # From there on every β = 1 - ᾱ_t / ᾱ_{t-1} would be 0 / 0 (a β of 1, or ᾱ underflowing float64).
        index = int(zero.nonzero()[0, 0])
        raise ValueError(
            f"beta_schedule {name!r} makes ᾱ_{index} = 0 before the last step (β[{index}] = {betas[index].item()!r}, "
            f"T={num_train_timesteps}); only the last ᾱ may be 0."
        )
    if rescale_betas_zero_snr:
        if num_train_timesteps < 2:
            raise ValueError(
                f"rescale_betas_zero_snr needs num_train_timesteps >= 2 (it keeps ᾱ_1 and sets ᾱ_T = 0), "
                f"got {num_train_timesteps}."
            )
        betas = rescale_zero_terminal_snr(betas)
    return betas
