"""diffusers schedulers over the exact DDPM posterior (`diffusion.py`)."""

from .base import PosteriorSchedulerBase, PosteriorSchedulerOutput, spaced_timesteps
from .ddim import DDIMPosteriorScheduler
from .ddpm import DDPMPosteriorScheduler

__all__ = [
    "DDIMPosteriorScheduler",
    "DDPMPosteriorScheduler",
    "PosteriorSchedulerBase",
    "PosteriorSchedulerOutput",
    "spaced_timesteps",
]
