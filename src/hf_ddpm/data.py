"""Images from Hugging Face `datasets` for training: loading, channel policy, augmentation, batching.

Sources (`load_image_dataset`): a Hub dataset id (through `datasets.load_dataset`, which caches), a local folder
of images (imagefolder), a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or, when nothing
is named, the built-in handwritten digits of scikit-learn (`digits_dataset`).

Training view (`prepare_dataset`): each row becomes `pixel_values: float32 [C, H, W]` in [-1, 1], where
`H = W = resolution`: resize the shorter side to `resolution`, crop (center or random), optionally flip
horizontally. `collate_fn` stacks rows into `{"pixel_values": [B, C, H, W], "labels": [B], "num_skipped": int}`.

Decisions, in one place:

* Channels follow the data: `infer_channels` votes over the first rows (1 for grayscale modes, 3 for colour;
  a tie goes to 3, which loses nothing), unless `channels=1|3` forces it. Every row of a dataset is converted
  to that count so batches stack.
* Transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited on white rather than dropped:
  the colour stored under fully transparent pixels is undefined (often black or leftovers), so dropping alpha can
  inject artefacts; white is how such images are meant to be seen on a page.
* High bit depth grayscale ('I;16*', 'I') is scaled from 0..65535 ('I' is what 16-bit PNG/TIFF decode to in
  several Pillow versions, so it is read as 16-bit too); float images ('F') are taken to lie in [0, 1]. They are
  resized in float so no precision is lost before the final [-1, 1] tensor.
* Unreadable images are skipped, not fatal: the image column is read undecoded (`Image(decode=False)`), so
  `datasets` never decodes a corrupt file itself; the row transform decodes with `datasets`' own decoder inside a
  try, logs the bad file, and emits `pixel_values=None`; `collate_fn` drops such rows and reports how many in
  `batch["num_skipped"]`, which `SkippedImages.update` accumulates in the training loop. The count travels in the
  batch because the collate function runs inside DataLoader worker processes, where a module-level counter would
  be lost.
* Determinism: every random choice for a row comes from its own generator,
  `numpy.random.default_rng((seed, epoch, index))`, where `index` is the row's position in the prepared dataset
  (an index column added by `prepare_dataset`). The augmentation therefore depends only on (seed, epoch, row),
  not on shuffling, batch size, worker count or how many rows were drawn before — a resumed run sees exactly the
  same crops and flips. For an `IterableDataset` the index is the row's position in the stream (as each
  DataLoader worker sees its shard), so there it is reproducible for the same stream order and worker count; a
  stream made from a map-style dataset (saved folder, digits) carries the index column and keys rows by it as the
  map-style path does. Call `set_epoch(ds, epoch)` at the start of every epoch (with `persistent_workers=False`, so
  workers pick up the new epoch). Each row always draws the same three numbers (crop top, crop left, flip) so
  switching one augmentation on or off does not change the others.
* Caching: `prepare_dataset(..., cache_bytes=N)` keeps transformed rows (before the flip) in memory when the crop
  cannot vary (center crop, or an image that is already square), so later epochs skip decoding and resizing while
  giving the same tensors; the trainer turns it on (`--cache_images_mb`) when it reads without DataLoader workers.
* Streaming (`load_image_dataset(streaming=True)`, then `shard_stream`): Hub ids and image folders stream through
  `datasets.load_dataset(..., streaming=True)` (one shard per data file); a saved folder or the digits becomes
  `Dataset.to_iterable_dataset` with up to `STREAM_SHARDS` shards, so that shards can be spread over processes and
  DataLoader workers. `shard_stream` shuffles (shard order plus a buffer, seeded by (seed, epoch) and the same on
  every process) and then keeps this process's part (`split_dataset_by_node`: whole shards when their count divides
  by the number of processes, else every world_size-th example), so the processes read disjoint rows.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any

import datasets
import numpy as np
import PIL.Image
import torch
from datasets.distributed import split_dataset_by_node

logger = logging.getLogger(__name__)

__all__ = [
    "IMAGE_COLUMN_CANDIDATES",
    "INDEX_COLUMN",
    "BatchTransform",
    "ImageTransform",
    "SkippedImages",
    "collate_fn",
    "decode_image",
    "digits_dataset",
    "find_image_column",
    "image_channels",
    "image_transform",
    "infer_channels",
    "load_image_dataset",
    "prepare_dataset",
    "set_epoch",
    "shard_stream",
]

AnyDataset = datasets.Dataset | datasets.IterableDataset

# Column names that usually hold images, tried in order when no column has an Image feature.
IMAGE_COLUMN_CANDIDATES: tuple[str, ...] = ("image", "img", "images", "pixel_values", "picture", "jpg", "png")
LABEL_COLUMN_CANDIDATES: tuple[str, ...] = ("label", "labels")
# Row position, added by `prepare_dataset` to map-style datasets: `set_transform` never sees row indices.
INDEX_COLUMN = "__hf_ddpm_index__"

_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
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
_DATA_FILE_EXTENSIONS = (".parquet", ".arrow")
# Shards of a stream made from a map-style dataset (saved folder, digits): enough for processes x workers.
STREAM_SHARDS = 64
# Rows a stream transforms at a time: `datasets`' default of 1000 would hold 1000 decoded images per worker.
STREAM_MAP_BATCH = 32


# --------------------------------------------------------------------------------------------- built-in digits


def digits_dataset() -> datasets.Dataset:
    """The 1,797 handwritten digits that ship with scikit-learn, as a `datasets.Dataset`.

    Columns: `image` (Image feature; PIL 'L', 8×8, the original 0..16 values scaled to 0..255) and `label`
    (ClassLabel '0'..'9'). Real data that needs no download, so training and tests run offline.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # scikit-learn is in the `train` extra, not a core dependency
        raise ImportError("the built-in digits dataset needs scikit-learn: pip install 'hf-ddpm[train]'") from err
    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # [1797, 8, 8], 0..255
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    images = [PIL.Image.fromarray(p) for p in pixels]  # 2-D uint8 -> mode 'L'
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


# --------------------------------------------------------------------------------------------------- loading


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str | None = None,
    split: str = "train",
    cache_dir: str | os.PathLike | None = None,
    streaming: bool = False,
) -> AnyDataset:
    """Load the raw image dataset for training (no transform applied; see `prepare_dataset`).

    `dataset_name` is a Hub id ("user/name", loaded and cached by `datasets.load_dataset`), a local folder of
    images, or a folder written by `save_to_disk`. `train_data_dir` is a local folder of images. With neither,
    the built-in digits (`digits_dataset`). The image column (`image_column`, or the one `find_image_column`
    finds) is checked here so a bad name fails before training starts.

    Raises:
        FileNotFoundError: a local path that does not exist (the message names it), or a Hub id that does not exist.
        ConnectionError: a Hub id that cannot be reached (the message names the id).
        ValueError: an empty dataset (naming the source), an unknown split, or no usable image column.
    """
    if dataset_name is not None and train_data_dir is not None:
        raise ValueError("give either dataset_name or train_data_dir, not both")
    if train_data_dir is not None:
        source = str(train_data_dir)
        ds = _load_local_folder(_existing_dir(train_data_dir), split, cache_dir, streaming, imagefolder=True)
    elif dataset_name is None:
        source = "the built-in digits dataset"
        ds = _digits_split(split)
    elif os.path.exists(os.path.expanduser(dataset_name)) or _looks_like_path(dataset_name):
        source = dataset_name
        ds = _load_local_folder(_existing_dir(dataset_name), split, cache_dir, streaming, imagefolder=False)
    else:
        source = f"Hub dataset {dataset_name!r}"
        ds = _load_hub(dataset_name, dataset_config_name, split, cache_dir, streaming)
    _check_not_empty(ds, source)
    find_image_column(ds, image_column)
    if streaming and isinstance(ds, datasets.Dataset):
        ds = _to_stream(ds)
    return ds


def _to_stream(ds: datasets.Dataset) -> datasets.IterableDataset:
    """A map-style dataset as a stream of up to `STREAM_SHARDS` contiguous shards, each row keeping its index (so
    that its augmentation is keyed by the row, as in the map-style path, and not by its place in the stream)."""
    ds = ds.add_column(INDEX_COLUMN, np.arange(len(ds), dtype=np.int64))
    return ds.to_iterable_dataset(num_shards=min(len(ds), STREAM_SHARDS))


def shard_stream(
    ds: datasets.IterableDataset, rank: int, world_size: int, seed: int = 0, buffer_size: int = 1000
) -> datasets.IterableDataset:
    """This process's part of a shuffled stream (apply before `prepare_dataset`).

    The shuffle (shard order, then a buffer of `buffer_size` rows) is seeded by `seed` on every process alike and
    changes with `set_epoch`; `datasets.distributed.split_dataset_by_node` then gives process `rank` of `world_size`
    whole shards (when the shard count divides by `world_size`) or every `world_size`-th example, so the processes
    read disjoint rows that together make the whole stream. Their parts may differ in length by a shard.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
    if buffer_size < 1:
        raise ValueError(f"buffer_size must be >= 1, got {buffer_size}")
    return split_dataset_by_node(ds.shuffle(seed=seed, buffer_size=buffer_size), rank=rank, world_size=world_size)


def _digits_split(split: str) -> datasets.Dataset:
    """The digits have one split; asking for another (say 'test') is an error, not a silent alias."""
    if split != "train":
        raise ValueError(f"the built-in digits dataset has only the 'train' split, not {split!r}")
    return digits_dataset()


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'owner/name'; anything else shaped like a path is meant as a local path."""
    return name.startswith((os.sep, ".", "~")) or "\\" in name or name.count("/") > 1 or name.endswith("/")


def _existing_dir(path: str | os.PathLike) -> str:
    """The expanded path, or a FileNotFoundError that names it."""
    full = os.path.expanduser(os.fspath(path))
    if not os.path.exists(full):
        raise FileNotFoundError(f"dataset path {os.fspath(path)!r} does not exist")
    if not os.path.isdir(full):
        raise NotADirectoryError(f"dataset path {os.fspath(path)!r} is not a folder (expected a folder of images)")
    return full


def _is_saved_dataset(path: str) -> bool:
    """True for a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    cfg = datasets.config
    if os.path.isfile(os.path.join(path, cfg.DATASETDICT_JSON_FILENAME)):
        return True
    return all(
        os.path.isfile(os.path.join(path, name))
        for name in (cfg.DATASET_STATE_JSON_FILENAME, cfg.DATASET_INFO_FILENAME)
    )


def _has_data_files(path: str) -> bool:
    """A Hub repo snapshot (parquet/arrow shards) rather than loose images."""
    return any(name.endswith(_DATA_FILE_EXTENSIONS) for _, _, files in os.walk(path) for name in files)


def _load_local_folder(
    path: str, split: str, cache_dir: str | os.PathLike | None, streaming: bool, imagefolder: bool
) -> AnyDataset:
    """Load a saved dataset, a repo snapshot of data files, or a folder of images (imagefolder)."""
    if _is_saved_dataset(path):
        return _load_saved(path, split)
    try:
        if not imagefolder and _has_data_files(path):
            return datasets.load_dataset(path, split=split, cache_dir=cache_dir, streaming=streaming)
        return datasets.load_dataset(
            "imagefolder", data_dir=path, split=split, cache_dir=cache_dir, streaming=streaming
        )
    except datasets.data_files.EmptyDatasetError as err:
        raise ValueError(f"dataset {path!r} is empty: it contains no image files") from err
    except ValueError as err:
        # datasets says 'Instruction "train" corresponds to no data!' for a folder with files but no images.
        if "corresponds to no data" in str(err):
            raise ValueError(f"dataset {path!r} is empty: no image files for split {split!r}") from err
        raise


def _load_saved(path: str, split: str) -> datasets.Dataset:
    """`load_from_disk`, picking `split` out of a DatasetDict (a plain Dataset is its own split)."""
    if os.path.isfile(os.path.join(path, datasets.config.DATASETDICT_JSON_FILENAME)):
        with open(os.path.join(path, datasets.config.DATASETDICT_JSON_FILENAME)) as f:
            splits = json.load(f)["splits"]
        if split not in splits:
            raise ValueError(f"saved dataset {path!r} has no split {split!r}; splits: {sorted(splits)}")
        path = os.path.join(path, split)
    if _saved_without_data(path):  # datasets (5.2) fails with an IndexError loading a 0-shard dataset
        raise ValueError(f"dataset {path} is empty: it has no rows")
    return datasets.load_from_disk(path)


def _saved_without_data(path: str) -> bool:
    """True for a `save_to_disk` folder of an empty Dataset (no arrow shards at all)."""
    with open(os.path.join(path, datasets.config.DATASET_STATE_JSON_FILENAME)) as f:
        return not json.load(f).get("_data_files")


def _load_hub(
    name: str, config_name: str | None, split: str, cache_dir: str | os.PathLike | None, streaming: bool
) -> AnyDataset:
    """`datasets.load_dataset` for a Hub id, with errors that say which id and what to try.

    Offline (HF_HUB_OFFLINE=1) an uncached id fails at once; with the network down but not declared offline,
    huggingface_hub retries with backoff (about 20 s) before giving up — slow, but it does end.
    """
    try:
        return datasets.load_dataset(name, config_name, split=split, cache_dir=cache_dir, streaming=streaming)
    except datasets.data_files.EmptyDatasetError as err:
        raise ValueError(f"Hub dataset {name!r} is empty: it has no data files") from err
    except ConnectionError as err:
        hint = (
            "HF_HUB_OFFLINE is set, so only cached datasets load"
            if datasets.config.HF_HUB_OFFLINE
            else "HF_HUB_OFFLINE=1 makes uncached ids fail at once instead of retrying"
        )
        raise ConnectionError(
            f"could not reach Hub dataset {name!r} at {datasets.config.HF_ENDPOINT} and it is not in the cache "
            f"({err}). No local folder {name!r} exists either. Check the id and the network, or pass a local "
            f"folder; {hint}."
        ) from err
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"Hub dataset {name!r} was not found ({err}); no local folder {name!r} exists either"
        ) from err


def _check_not_empty(ds: AnyDataset, source: str) -> None:
    """A map-style dataset with no rows is an error; a stream cannot be counted without reading it."""
    if isinstance(ds, datasets.Dataset) and len(ds) == 0:
        raise ValueError(f"dataset {source} is empty: it has no rows")


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


# ---------------------------------------------------------------------------------------------- transforms


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


# ----------------------------------------------------------------------------------------- dataset plumbing


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


# --------------------------------------------------------------------------------------------------- batches


@dataclass
class SkippedImages:
    """Running count of unreadable images, for the training loop's logs.

    `collate_fn` reports each batch's drops in `batch["num_skipped"]` (it may run in a worker process, so it
    cannot update a counter here); call `update(batch)` in the loop's own process.
    """

    count: int = 0

    def update(self, batch: dict[str, Any]) -> int:
        """Add this batch's skipped rows; returns how many there were."""
        skipped = int(batch.get("num_skipped", 0))
        self.count += skipped
        return skipped


def collate_fn(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Rows from `prepare_dataset` -> `{"pixel_values": float32 [B, C, H, W], "labels": int64 [B] (if labelled),
    "num_skipped": int}`, dropping rows whose image could not be read. If every row was dropped, B = 0 and
    `pixel_values` has shape [0, 0, 0, 0]: the loop should skip such a batch."""
    kept = [row for row in examples if row.get("pixel_values") is not None]
    batch: dict[str, Any] = {"num_skipped": len(examples) - len(kept)}
    if kept:
        batch["pixel_values"] = torch.stack([row["pixel_values"] for row in kept]).contiguous()
    else:
        batch["pixel_values"] = torch.empty((0, 0, 0, 0), dtype=torch.float32)
    if examples and "label" in examples[0]:
        batch["labels"] = torch.tensor(
            [-1 if row["label"] is None else int(row["label"]) for row in kept], dtype=torch.long
        )
    return batch
