"""hf_ddpm.images: the one grid used by training's sample logs and by the Space."""

import numpy as np
import pytest

from hf_ddpm.images import as_uint8, grid_size, image_grid, upscale


def test_float_and_uint8_images_give_the_same_grid():
    floats = np.random.default_rng(0).random((5, 4, 6, 3))
    assert np.array_equal(np.asarray(image_grid(floats)), np.asarray(image_grid(as_uint8(floats))))
    assert as_uint8(np.array([-0.5, 0.0, 0.5, 1.5]))[[0, 1, 3]].tolist() == [0, 0, 255]


@pytest.mark.parametrize(("n", "channels", "margin"), [(1, 1, 0), (3, 1, 2), (5, 3, 0), (9, 3, 4)])
def test_grid_places_each_enlarged_tile(n, channels, margin):
    h, w, gap, min_tile = 4, 6, 3, 10  # scale ⌈10/4⌉ = 3: tiles of 12 x 18
    images = np.random.default_rng(n).integers(0, 256, (n, h, w, channels), dtype=np.uint8)
    grid = np.asarray(image_grid(images, min_tile=min_tile, gap=gap, fill=7, margin=margin))
    grid = grid[..., None] if channels == 1 else grid
    assert (grid.shape[1], grid.shape[0]) == grid_size(n, h, w, min_tile, gap, margin)
    cols = int(np.ceil(np.sqrt(n)))
    for i, image in enumerate(images):
        top, left = margin + (i // cols) * (12 + gap), margin + (i % cols) * (18 + gap)
        tile = grid[top : top + 12, left : left + 18]
        assert np.array_equal(tile[::3, ::3], image) and np.array_equal(tile[2::3, 2::3], image)
    assert (grid[:margin] == 7).all() and (grid[:, :margin] == 7).all()


def test_upscale_keeps_pixels_and_reaches_min_size():
    image = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
    big = np.asarray(upscale(image, 10))  # factor 4
    assert big.shape == (12, 16) and np.array_equal(big[::4, ::4], image[..., 0])
    assert upscale(image, 2).size == (4, 3)
