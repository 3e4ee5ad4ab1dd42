"""hf_ddpm: DDPM (Ho et al. 2020) and DDIM (Song et al. 2021) as swappable diffusers parts."""

__version__ = "0.1.0"
