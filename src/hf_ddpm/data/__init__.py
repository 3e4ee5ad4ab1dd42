"""Images from Hugging Face `datasets` for training: loading, channel policy, augmentation, batching.

One idea per module, all names re-exported here (`from hf_ddpm.data import prepare_dataset`):

* `sources`: where images come from (`load_image_dataset`: a Hub id, an image folder, a `save_to_disk` folder, or
  the built-in digits `digits_dataset`) and how a stream is split between processes (`shard_stream`).
* `columns`: which column holds the images and labels, decoding one cell (`decode_image`), and the channel policy
  (`infer_channels`, `image_channels`).
* `transforms`: one PIL image -> `float32 [C, H, W]` in [-1, 1] (`ImageTransform`: resize, crop, flip, scale).
* `prepare`: the training view of a dataset (`prepare_dataset`, `set_epoch`): per-row seeded augmentation, unreadable
  images skipped, the optional in-memory row cache (`BatchTransform`).
* `collate`: rows -> batches (`collate_fn`) and the running count of skipped images (`SkippedImages`).
"""

from .collate import SkippedImages, collate_fn
from .columns import (
    IMAGE_COLUMN_CANDIDATES,
    INDEX_COLUMN,
    LABEL_COLUMN_CANDIDATES,
    AnyDataset,
    decode_image,
    find_image_column,
    image_channels,
    infer_channels,
)
from .prepare import STREAM_MAP_BATCH, BatchTransform, prepare_dataset, set_epoch
from .sources import STREAM_SHARDS, digits_dataset, load_image_dataset, shard_stream
from .transforms import ImageTransform, image_transform

__all__ = [
    "IMAGE_COLUMN_CANDIDATES",
    "INDEX_COLUMN",
    "LABEL_COLUMN_CANDIDATES",
    "STREAM_MAP_BATCH",
    "STREAM_SHARDS",
    "AnyDataset",
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
