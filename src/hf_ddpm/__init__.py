"""hf_ddpm: DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) as swappable diffusers parts.

Importing the package registers it with diffusers, so `DiffusionPipeline.from_pretrained` loads hf_ddpm pipelines.
"""

from ._version import __version__ as __version__  # the one place: _version.py (pyproject reads it too)
from .diffusion import GaussianDiffusion
from .models import DDPMUNet, DDPMUNetOutput
from .pipeline import HFDDPMPipeline, HFDDPMPipelineOutput
from .registration import register_with_diffusers
from .schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler, PosteriorSchedulerOutput
from .schedules import make_betas, rescale_zero_terminal_snr

__all__ = [
    "DDIMPosteriorScheduler",
    "DDPMPosteriorScheduler",
    "DDPMUNet",
    "DDPMUNetOutput",
    "GaussianDiffusion",
    "HFDDPMPipeline",
    "HFDDPMPipelineOutput",
    "PosteriorSchedulerOutput",
    "make_betas",
    "rescale_zero_terminal_snr",
]

register_with_diffusers(
    {
        "HFDDPMPipeline": HFDDPMPipeline,
        "DDPMUNet": DDPMUNet,
        "DDPMPosteriorScheduler": DDPMPosteriorScheduler,
        "DDIMPosteriorScheduler": DDIMPosteriorScheduler,
    }
)
