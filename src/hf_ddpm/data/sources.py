"""Where training images come from (`load_image_dataset`), and how a stream is split between processes
(`shard_stream`).

Sources: a Hub dataset id (through `datasets.load_dataset`, which caches), a local folder of images (imagefolder),
a folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`, or, when nothing is named, the built-in
handwritten digits of scikit-learn (`digits_dataset`).

Streaming (`load_image_dataset(streaming=True)`, then `shard_stream`): Hub ids and image folders stream through
`datasets.load_dataset(..., streaming=True)` (one shard per data file); a saved folder or the digits becomes
`Dataset.to_iterable_dataset` with up to `STREAM_SHARDS` shards, so that shards can be spread over processes and
DataLoader workers. `shard_stream` shuffles (shard order plus a buffer, seeded by (seed, epoch) and the same on
every process) and then keeps this process's part (`split_dataset_by_node`: whole shards when their count divides
by the number of processes, else every world_size-th example), so the processes read disjoint rows.
"""

from __future__ import annotations

import json
import os

import datasets
import numpy as np
import PIL.Image
from datasets.distributed import split_dataset_by_node

from .columns import INDEX_COLUMN, AnyDataset, find_image_column

_DATA_FILE_EXTENSIONS = (".parquet", ".arrow")
# Shards of a stream made from a map-style dataset (saved folder, digits): enough for processes x workers.
STREAM_SHARDS = 64


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
