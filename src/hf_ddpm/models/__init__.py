"""Networks: the DDPM U-Net."""

from .unet import UNET_PRESETS, DDPMUNet, DDPMUNetOutput

__all__ = ["DDPMUNet", "DDPMUNetOutput", "UNET_PRESETS"]
