"""Pictures of samples: nearest-neighbour enlargement and near-square grids, for training logs and the Space."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image


def as_uint8(images: np.ndarray) -> np.ndarray:
    """[..., H, W, C] images: uint8 as they are, floats in [0, 1] rounded to uint8 (clipped)."""
    if images.dtype == np.uint8:
        return images
    return np.round(np.clip(images, 0, 1) * 255).astype(np.uint8)


def upscale_factor(height: int, min_size: int) -> int:
    """The whole factor that makes an image of `height` pixels at least `min_size` tall (1 if it already is)."""
    return max(1, math.ceil(min_size / height))


def upscale(image: np.ndarray, min_size: int) -> PIL.Image.Image:
    """One [H, W, C] image (uint8, or floats in [0, 1]) as a PIL image enlarged by a whole factor with nearest
    neighbours, so pixels stay visible, until it is at least `min_size` tall."""
    scale = upscale_factor(image.shape[0], min_size)
    pixels = as_uint8(image).repeat(scale, axis=0).repeat(scale, axis=1)
    return PIL.Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)


def grid_shape(num_images: int) -> tuple[int, int]:
    """(rows, columns) of the near-square grid: ⌈√N⌉ columns."""
    cols = math.ceil(math.sqrt(num_images))
    return math.ceil(num_images / cols), cols


def grid_size(num_images: int, height: int, width: int, min_tile: int, gap: int, margin: int = 0) -> tuple[int, int]:
    """(width, height) in pixels of `image_grid`'s picture of `num_images` images of height x width."""
    rows, cols = grid_shape(num_images)
    scale = upscale_factor(height, min_tile)
    return (
        cols * width * scale + (cols - 1) * gap + 2 * margin,
        rows * height * scale + (rows - 1) * gap + 2 * margin,
    )


def image_grid(
    images: np.ndarray, min_tile: int = 64, gap: int = 2, fill: int = 128, margin: int = 0
) -> PIL.Image.Image:
    """Tile [N, H, W, C] images (uint8, or floats in [0, 1]) into a near-square grid, each enlarged as `upscale`
    does to at least `min_tile` pixels tall, with `gap` pixels between tiles and `margin` around them, all of gray
    level `fill`."""
    n, h, w, c = images.shape
    rows, cols = grid_shape(n)
    scale = upscale_factor(h, min_tile)
    tile_h, tile_w = h * scale, w * scale
    width, height = grid_size(n, h, w, min_tile, gap, margin)
    grid = np.full((height, width, c), fill, dtype=np.uint8)
    pixels = as_uint8(images).repeat(scale, axis=1).repeat(scale, axis=2)
    for i, image in enumerate(pixels):
        row, col = divmod(i, cols)
        top, left = margin + row * (tile_h + gap), margin + col * (tile_w + gap)
        grid[top : top + tile_h, left : left + tile_w] = image
    return PIL.Image.fromarray(grid[..., 0] if c == 1 else grid)
