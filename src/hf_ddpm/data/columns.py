"""Images inside a dataset: which column holds them (and the labels), how one cell decodes, and how many channels
the data calls for.

* Channels follow the data: `infer_channels` votes over the first rows (1 for grayscale modes, 3 for colour;
  a tie goes to 3, which loses nothing), unless `channels=1|3` forces it. Every row of a dataset is converted
  to that count so batches stack.
* The image column is read undecoded (`_undecoded`, `Image(decode=False)`), so `datasets` never decodes a corrupt
  file itself: `decode_image` does, with `datasets`' own decoder, where the caller can catch the error and skip the
  row (see `hf_ddpm.data.prepare`).
"""

from __future__ import annotations

from collections.abc import Iterable
from io import BytesIO
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch

AnyDataset = datasets.Dataset | datasets.IterableDataset

# Column names that usually hold images, tried in order when no column has an Image feature.
IMAGE_COLUMN_CANDIDATES: tuple[str, ...] = ("image", "img", "images", "pixel_values", "picture", "jpg", "png")
LABEL_COLUMN_CANDIDATES: tuple[str, ...] = ("label", "labels")
# Row position, added by `prepare_dataset` to map-style datasets: `set_transform` never sees row indices.
INDEX_COLUMN = "__hf_ddpm_index__"

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


# ------------------------------------------------------------------------------------------------ columns


def _column_names(ds: AnyDataset) -> list[str]:
    """Column names; a stream whose features are unknown is peeked at."""
    if ds.column_names is not None:
        return list(ds.column_names)
    return list(next(iter(ds.take(1))).keys())


def find_image_column(ds: AnyDataset, image_column: str | None = None) -> str:
    """The image column: `image_column` if given, else the first Image feature, else a common name.

    Raises:
        ValueError: naming the requested column (if any) and listing the available ones.
    """
    columns = _column_names(ds)
    if image_column is not None:
        if image_column not in columns:
            raise ValueError(f"image column {image_column!r} not found; available columns: {columns}")
        return image_column
    features = ds.features or {}
    for name in columns:
        if isinstance(features.get(name), datasets.Image):
            return name
    for name in IMAGE_COLUMN_CANDIDATES:
        if name in columns:
            return name
    raise ValueError(
        f"no image column found (no Image feature, none of {list(IMAGE_COLUMN_CANDIDATES)}); "
        f"available columns: {columns}. Name one with image_column=..."
    )


def _find_label_column(ds: AnyDataset) -> str | None:
    """The first ClassLabel column, else 'label' / 'labels'; None when the data is unlabelled."""
    features = ds.features or {}
    for name, feature in features.items():
        if isinstance(feature, datasets.ClassLabel):
            return name
    columns = _column_names(ds)
    return next((name for name in LABEL_COLUMN_CANDIDATES if name in columns), None)


def _image_decoder(ds: AnyDataset, image_column: str) -> datasets.Image:
    """A decoding Image feature that keeps the column's declared `mode`, if any."""
    feature = (ds.features or {}).get(image_column)
    mode = feature.mode if isinstance(feature, datasets.Image) else None
    return datasets.Image(mode=mode, decode=True)


def _undecoded(ds: AnyDataset, image_column: str) -> AnyDataset:
    """The dataset with its image column left as {bytes, path}, so that a corrupt file is our problem to decode
    (and skip), not an exception inside `datasets`' formatting."""
    feature = (ds.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return ds.cast_column(image_column, datasets.Image(mode=feature.mode, decode=False))
    return ds


# ------------------------------------------------------------------------------------------------- decoding


def decode_image(value: Any, decoder: datasets.Image | None = None) -> PIL.Image.Image:
    """One image cell -> PIL image (mode as stored). Raises whatever PIL raises for an unreadable file.

    Accepts a PIL image, `{"bytes", "path"}` or a path (decoded by `datasets`' own decoder, which also reads
    remote paths of streamed datasets and applies EXIF orientation), raw bytes, or an array [H, W] / [H, W, C].
    """
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, (dict, str)):
        return (decoder or datasets.Image()).decode_example(value)
    if isinstance(value, (bytes, bytearray)):
        image = PIL.Image.open(BytesIO(value))
        image.load()
        return image
    if isinstance(value, (np.ndarray, list, torch.Tensor)):
        return PIL.Image.fromarray(np.asarray(value))
    raise TypeError(f"cannot read an image from a {type(value).__name__}")


def _is_gray(image: PIL.Image.Image) -> bool:
    """Grayscale modes, and palettes whose every entry is gray."""
    if image.mode in _GRAY_MODES:
        return True
    if image.mode in ("P", "PA"):
        palette = np.asarray(image.getpalette() or [], dtype=np.uint8).reshape(-1, 3)
        return bool(np.all(palette == palette[:, :1]))
    return False


def image_channels(image: PIL.Image.Image) -> int:
    """1 for a grayscale image, 3 for anything with colour."""
    return 1 if _is_gray(image) else 3


def infer_channels(ds: AnyDataset, image_column: str, num_samples: int = 32) -> int:
    """Channels the data calls for: majority vote of the first `num_samples` readable images (tie -> 3).

    An Image feature with a declared `mode` decides without reading. Unreadable images are ignored here.
    """
    decoder = _image_decoder(ds, image_column)
    if decoder.mode is not None:
        return 1 if decoder.mode in _GRAY_MODES else 3
    votes = [image_channels(image) for image in _first_images(ds, image_column, decoder, num_samples)]
    if not votes:
        raise ValueError(f"none of the first {num_samples} images in column {image_column!r} could be read")
    return 1 if votes.count(1) > votes.count(3) else 3


def _first_images(
    ds: AnyDataset, image_column: str, decoder: datasets.Image, num_samples: int
) -> Iterable[PIL.Image.Image]:
    """Decoded images of the first rows, skipping unreadable ones."""
    if isinstance(ds, datasets.Dataset):
        raw = ds.with_format(None)
        values = _undecoded(raw.select(range(min(num_samples, len(raw)))), image_column)[image_column]
    else:
        values = (row[image_column] for row in _undecoded(ds, image_column).take(num_samples))
    for value in values:
        try:
            yield decode_image(value, decoder)
        except Exception:  # a corrupt file must not decide (or break) the vote
            continue
