"""The per-image transform: PIL image -> `float32 [C, resolution, resolution]` in [-1, 1] (resize the shorter side,
crop to a square, optionally flip, scale).

* Transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited on white rather than dropped:
  the colour stored under fully transparent pixels is undefined (often black or leftovers), so dropping alpha can
  inject artefacts; white is how such images are meant to be seen on a page.
* High bit depth grayscale ('I;16*', 'I') is scaled from 0..65535 ('I' is what 16-bit PNG/TIFF decode to in
  several Pillow versions, so it is read as 16-bit too); float images ('F') are taken to lie in [0, 1]. They are
  resized in float so no precision is lost before the final [-1, 1] tensor.
* Each call always draws the same three numbers (crop top, crop left, flip) so switching one augmentation on or off
  does not change the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from .columns import image_channels

_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_INTERPOLATIONS = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "box": PIL.Image.Resampling.BOX,
    "hamming": PIL.Image.Resampling.HAMMING,
}


@dataclass
class ImageTransform:
    """PIL image -> `float32 [C, resolution, resolution]` in [-1, 1].

    Resize the shorter side to `resolution` (the longer one scales with it, truncated, as torchvision's
    `Resize(int)`), crop to a square (center, or random), optionally flip horizontally. `channels=None` keeps
    the image's own kind (1 for grayscale, 3 for colour); 1 or 3 converts (RGB -> gray by ITU-R 601 luma).
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = False
    channels: int | None = None
    interpolation: str | PIL.Image.Resampling = "bilinear"

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"resolution must be positive, got {self.resolution}")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"channels must be None, 1 or 3, got {self.channels}")
        if isinstance(self.interpolation, str):
            if self.interpolation not in _INTERPOLATIONS:
                raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {self.interpolation!r}")
            self.interpolation = _INTERPOLATIONS[self.interpolation]

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        """`rng` draws the crop and flip; None draws from fresh OS entropy (not reproducible)."""
        u = (rng or np.random.default_rng()).random(3)  # always 3 draws: crop top, crop left, flip
        return self.flipped(self.cropped(image, u[0], u[1])[0], u[2])

    @property
    def is_random(self) -> bool:
        """Whether any draw can change an output (a random crop or flip is on)."""
        return self.random_flip or not self.center_crop

    def cropped(self, image: PIL.Image.Image, u_top: float, u_left: float) -> tuple[torch.Tensor, bool]:
        """Resized and cropped, not yet flipped: `[C, resolution, resolution]`, and whether the crop was the
        same for any `(u_top, u_left)` (a center crop, or an image already square), so that it may be reused."""
        channels = self.channels or image_channels(image)
        work = self._resize(_to_working_image(image, channels))
        fixed = self.center_crop or work.size == (self.resolution, self.resolution)
        return _to_tensor(self._crop(work, u_top, u_left), channels), fixed

    def flipped(self, pixels: torch.Tensor, u_flip: float) -> torch.Tensor:
        """`pixels` mirrored left-right when flips are on and `u_flip < 0.5` (a new tensor), else `pixels`."""
        return pixels.flip(-1) if self.random_flip and u_flip < 0.5 else pixels

    def _resize(self, image: PIL.Image.Image) -> PIL.Image.Image:
        """Shorter side -> resolution."""
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new_long = max(self.resolution, int(self.resolution * long / short))
        size = (self.resolution, new_long) if w <= h else (new_long, self.resolution)
        return image if size == (w, h) else image.resize(size, resample=self.interpolation)

    def _crop(self, image: PIL.Image.Image, u_top: float, u_left: float) -> PIL.Image.Image:
        """Square crop; center as torchvision's CenterCrop, random offsets uniform over the valid range."""
        w, h = image.size
        r = self.resolution
        if self.center_crop:
            top, left = int(round((h - r) / 2.0)), int(round((w - r) / 2.0))
        else:
            top, left = int(u_top * (h - r + 1)), int(u_left * (w - r + 1))
        return image if (w, h) == (r, r) else image.crop((left, top, left + r, top + r))


def image_transform(
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    channels: int | None = None,
    interpolation: str | PIL.Image.Resampling = "bilinear",
) -> ImageTransform:
    """Build the per-image transform: PIL image -> `float32 [C, resolution, resolution]` in [-1, 1]."""
    return ImageTransform(resolution, center_crop, random_flip, channels, interpolation)


def _composite_on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGBA-like -> RGB over an opaque white background (see the module docstring for why not drop alpha)."""
    rgba = image.convert("RGBA")
    background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(background, rgba).convert("RGB")


def _to_working_image(image: PIL.Image.Image, channels: int) -> PIL.Image.Image:
    """Any PIL mode -> 'L' or 'RGB' (8-bit), or 'F' with values 0..255 for high bit depth / float gray."""
    if image.mode in _HIGH_BIT_MODES or image.mode == "F":
        scale = 255.0 / 65535.0 if image.mode in _HIGH_BIT_MODES else 255.0
        gray = np.clip(np.asarray(image, dtype=np.float32) * scale, 0.0, 255.0)
        return PIL.Image.fromarray(gray.astype(np.float32))  # resized in float: keep the extra bits
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        image = _composite_on_white(image)
    return image.convert("L" if channels == 1 else "RGB")


def _to_tensor(image: PIL.Image.Image, channels: int) -> torch.Tensor:
    """'L' / 'RGB' / 'F' (0..255) -> `float32 [C, H, W]` in [-1, 1]; gray is repeated when 3 channels are asked."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    array = np.clip(array, -1.0, 1.0)  # float resizes (bicubic, lanczos) overshoot
    if array.ndim == 2:
        array = np.repeat(array[None], channels, axis=0)
    else:
        array = array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))
