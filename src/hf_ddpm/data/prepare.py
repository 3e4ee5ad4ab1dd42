"""The training view of a dataset (`prepare_dataset`): each row becomes `pixel_values: float32 [C, H, W]` in
[-1, 1] (through `ImageTransform`), or None when its image cannot be read.

* Unreadable images are skipped, not fatal: the row transform decodes inside a try, logs the bad file, and emits
  `pixel_values=None`; `collate_fn` drops such rows and counts them (see `hf_ddpm.data.collate`).
* Determinism: every random choice for a row comes from its own generator,
  `numpy.random.default_rng((seed, epoch, index))`, where `index` is the row's position in the prepared dataset
  (an index column added by `prepare_dataset`). The augmentation therefore depends only on (seed, epoch, row),
  not on shuffling, batch size, worker count or how many rows were drawn before — a resumed run sees exactly the
  same crops and flips. For an `IterableDataset` the index is the row's position in the stream (as each
  DataLoader worker sees its shard), so there it is reproducible for the same stream order and worker count; a
  stream made from a map-style dataset (saved folder, digits) carries the index column and keys rows by it as the
  map-style path does. Call `set_epoch(ds, epoch)` at the start of every epoch (with `persistent_workers=False`, so
  workers pick up the new epoch).
* Caching: `prepare_dataset(..., cache_bytes=N)` keeps transformed rows (before the flip) in memory when the crop
  cannot vary (center crop, or an image that is already square), so later epochs skip decoding and resizing while
  giving the same tensors; the trainer turns it on (`--cache_images_mb`) when it reads without DataLoader workers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch

from .columns import (
    INDEX_COLUMN,
    AnyDataset,
    _column_names,
    _find_label_column,
    _image_decoder,
    _undecoded,
    decode_image,
    find_image_column,
    infer_channels,
)
from .transforms import ImageTransform, image_transform

logger = logging.getLogger(__name__)

# Rows a stream transforms at a time: `datasets`' default of 1000 would hold 1000 decoded images per worker.
STREAM_MAP_BATCH = 32


@dataclass
class BatchTransform:
    """Rows of the raw dataset -> training rows: `pixel_values` (`[C, H, W]`, or None when unreadable), plus
    `label` when the data has one. Used by `Dataset.set_transform` and by `IterableDataset.map`.

    Per-row randomness comes from `default_rng((seed, epoch, index))` (see the module docstring).

    `cache_bytes > 0` keeps rows' resized and cropped tensors (before the flip) in memory, up to that many bytes,
    when their crop is fixed (`ImageTransform.cropped`): later epochs then skip decoding and resizing, and produce
    the same tensors bit for bit. Rows must be keyed by identity (the index column of a map-style dataset), and the
    cache lives in this object, so it only pays off in the process that keeps it (no DataLoader workers, which get
    a copy per epoch). Copies and pickles of the transform start with an empty cache.
    """

    transform: ImageTransform
    image_column: str
    decoder: datasets.Image
    label_column: str | None = None
    seed: int = 0
    epoch: int = 0
    cache_bytes: int = 0
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)
    _cached_bytes: int = field(default=0, init=False, repr=False, compare=False)

    def __call__(self, batch: dict[str, list], indices: Sequence[int] | None = None) -> dict[str, list]:
        if indices is None:
            indices = batch[INDEX_COLUMN]
        pixels = [self._row(value, int(index)) for value, index in zip(batch[self.image_column], indices)]
        out: dict[str, list] = {"pixel_values": pixels}
        if self.label_column is not None:
            out["label"] = list(batch[self.label_column])
        return out

    def rng(self, index: int) -> np.random.Generator:
        """The generator for row `index` in the current epoch."""
        return np.random.default_rng((self.seed, self.epoch, index))

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_cache"], state["_cached_bytes"] = {}, 0
        return state

    def _row(self, value: Any, index: int) -> torch.Tensor | None:
        """One image, or None (logged) when it cannot be read."""
        # The generator is only built when a draw can matter: building it costs more than a cached row.
        u = self.rng(index).random(3) if self.transform.is_random else np.zeros(3)
        pixels = self._cache.get(index)
        if pixels is None:
            try:
                image = decode_image(value, self.decoder)
            except Exception as err:  # corrupt files raise OSError, SyntaxError, ValueError, zlib errors...
                logger.warning("skipping unreadable image %s (row %d): %s", _describe(value), index, err)
                return None
            pixels, fixed = self.transform.cropped(image, u[0], u[1])
            size = pixels.numel() * pixels.element_size()
            if fixed and self._cached_bytes + size <= self.cache_bytes:
                self._cache[index] = pixels
                self._cached_bytes += size
        out = self.transform.flipped(pixels, u[2])
        # The caller may write to what it gets: a cached tensor is handed out as a copy.
        return out.clone() if out is self._cache.get(index) else out


def _describe(value: Any) -> str:
    """The file path of a cell when known, for log lines."""
    if isinstance(value, dict) and value.get("path"):
        return repr(value["path"])
    return f"<{type(value).__name__}>"


def prepare_dataset(
    ds: AnyDataset,
    image_column: str | None,
    resolution: int,
    center_crop: bool = True,
    random_flip: bool = False,
    channels: int | None = None,
    seed: int = 0,
    *,
    interpolation: str | PIL.Image.Resampling = "bilinear",
    epoch: int = 0,
    cache_bytes: int = 0,
) -> AnyDataset:
    """The training view of `ds`: rows `{"pixel_values": float32 [C, resolution, resolution] in [-1, 1] or None,
    "label": int (if labelled)}`; the input dataset is left untouched.

    `channels=None` follows the data (`infer_channels`). A `Dataset` gets the transform through
    `set_transform` (lazy, per fetched batch) after an index column is added for per-row seeding; an
    `IterableDataset` gets it through `.map` with stream indices. Use `set_epoch` every epoch and `collate_fn`
    in the DataLoader. `cache_bytes` (a `Dataset` only) keeps up to that many bytes of transformed rows in memory
    for later epochs (see `BatchTransform`).
    """
    if seed < 0 or epoch < 0:
        raise ValueError("seed and epoch must be non-negative")
    if cache_bytes < 0:
        raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
    if cache_bytes and not isinstance(ds, datasets.Dataset):
        raise ValueError(
            f"cache_bytes={cache_bytes} needs a map-style Dataset: a stream's rows are not revisited by index"
        )
    column = find_image_column(ds, image_column)
    if channels is None:
        channels = infer_channels(ds, column)
    batch_transform = BatchTransform(
        transform=image_transform(resolution, center_crop, random_flip, channels, interpolation),
        image_column=column,
        decoder=_image_decoder(ds, column),
        label_column=_find_label_column(ds),
        seed=seed,
        epoch=epoch,
        cache_bytes=cache_bytes,
    )
    raw = _undecoded(ds, column)
    if isinstance(raw, datasets.Dataset):
        return _prepare_map_style(raw, batch_transform)
    return _prepare_iterable(raw, batch_transform)


def _prepare_map_style(ds: datasets.Dataset, batch_transform: BatchTransform) -> datasets.Dataset:
    """Index column + lazy transform reading only the columns it needs (other image columns stay undecoded)."""
    if INDEX_COLUMN not in ds.column_names:
        ds = ds.add_column(INDEX_COLUMN, np.arange(len(ds), dtype=np.int64))
    columns = [batch_transform.image_column, INDEX_COLUMN]
    if batch_transform.label_column is not None:
        columns.append(batch_transform.label_column)
    return ds.with_transform(batch_transform, columns=columns)


def _prepare_iterable(ds: datasets.IterableDataset, batch_transform: BatchTransform) -> datasets.IterableDataset:
    """`.map` with the index column when the stream has one (`_to_stream`), else with stream indices; the transform
    is kept on the result so `set_epoch` can reach it."""
    columns = _column_names(ds)
    indexed = INDEX_COLUMN in columns
    prepared = ds.map(
        batch_transform,
        batched=True,
        batch_size=STREAM_MAP_BATCH,
        with_indices=not indexed,
        remove_columns=columns,
    )
    prepared._hf_ddpm_transform = batch_transform
    return prepared


def _batch_transform_of(ds: AnyDataset) -> BatchTransform | None:
    """The BatchTransform that `prepare_dataset` attached to `ds`, if any."""
    if isinstance(ds, datasets.Dataset):
        transform = ds.format["format_kwargs"].get("transform")
    else:
        transform = getattr(ds, "_hf_ddpm_transform", None)
    return transform if isinstance(transform, BatchTransform) else None


def set_epoch(ds: AnyDataset, epoch: int) -> None:
    """Select the epoch whose augmentation `ds` (from `prepare_dataset`) produces; also reseeds a stream's
    shuffle buffer. Call before iterating each epoch; DataLoader workers must not be persistent to see it."""
    batch_transform = _batch_transform_of(ds)
    if batch_transform is None:
        raise ValueError("set_epoch needs a dataset returned by prepare_dataset (apply shuffles before it)")
    batch_transform.epoch = epoch
    if isinstance(ds, datasets.IterableDataset):
        ds.set_epoch(epoch)
