"""Sample grids during and after training: DDIM sampling with a fixed seed, tiled into one PNG."""

from __future__ import annotations

import inspect
import io
import os
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..atomic_files import atomic_write
from ..images import image_grid
from ..pipeline import HFDDPMPipeline
from ..schedulers import DDIMPosteriorScheduler


@torch.no_grad()
def sample_images(
    unet: torch.nn.Module, scheduler_config: dict[str, Any], num_images: int, num_inference_steps: int, seed: int
) -> np.ndarray:
    """`num_images` DDIM samples (η = 0) as float32 [N, H, W, C] in [0, 1]; the same seed gives the same start
    noise, so grids of successive steps show the model changing, not the noise. `unet` keeps its train/eval mode."""
    # Only DDIM's keys: the DDPM-only ones (variance_type, ...) would each log an "unexpected key" warning.
    keys = inspect.signature(DDIMPosteriorScheduler.__init__).parameters
    scheduler = DDIMPosteriorScheduler.from_config({k: v for k, v in scheduler_config.items() if k in keys})
    pipeline = HFDDPMPipeline(unet=unet, scheduler=scheduler)
    pipeline.set_progress_bar_config(disable=True)
    was_training = unet.training
    unet.eval()
    try:
        generator = torch.Generator(device=unet.device).manual_seed(seed)
        out = pipeline(
            batch_size=num_images, num_inference_steps=num_inference_steps, generator=generator, output_type="np"
        )
    finally:
        unet.train(was_training)
    return out.images


def save_grid(images: np.ndarray, path: str | os.PathLike) -> PIL.Image.Image:
    """Write the grid of `images` as a PNG (atomically); returns it."""
    grid = image_grid(images)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
    return grid
