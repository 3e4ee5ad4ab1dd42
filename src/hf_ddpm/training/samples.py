"""Sample grids during and after training: DDIM sampling with a fixed seed, tiled into one PNG."""

from __future__ import annotations

import inspect
import io
import math
import os
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..atomic_files import atomic_write
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


def image_grid(images: np.ndarray, min_tile: int = 64, gap: int = 2) -> PIL.Image.Image:
    """Tile [N, H, W, C] images in [0, 1] into a near-square grid with `gap` gray pixels between tiles; small
    images are enlarged (nearest neighbour, so pixels stay visible) until a tile is at least `min_tile` wide."""
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    scale = max(1, math.ceil(min_tile / w))
    th, tw = h * scale, w * scale
    pixels = np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=1).repeat(scale, axis=2)
    grid = np.full((rows * (th + gap) - gap, cols * (tw + gap) - gap, c), 128, dtype=np.uint8)
    for i, image in enumerate(pixels):
        r, k = divmod(i, cols)
        grid[r * (th + gap) : r * (th + gap) + th, k * (tw + gap) : k * (tw + gap) + tw] = image
    return PIL.Image.fromarray(grid[..., 0] if c == 1 else grid)


def save_grid(images: np.ndarray, path: str | os.PathLike) -> PIL.Image.Image:
    """Write the grid of `images` as a PNG (atomically); returns it."""
    grid = image_grid(images)
    buffer = io.BytesIO()
    grid.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())
    return grid
