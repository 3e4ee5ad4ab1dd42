"""Tests for hf_ddpm.data: sources, image column, channel policy, transforms, corrupt files, determinism."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from hf_ddpm.data import (
    INDEX_COLUMN,
    SkippedImages,
    collate_fn,
    digits_dataset,
    find_image_column,
    image_transform,
    infer_channels,
    load_image_dataset,
    prepare_dataset,
    set_epoch,
)

# ------------------------------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def digits() -> datasets.Dataset:
    return digits_dataset()


@pytest.fixture
def cache_dir(tmp_path: Path) -> str:
    """Keep `datasets`' imagefolder cache out of the user's home."""
    return str(tmp_path / "hf_cache")


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 from now on in this test. The variable is read at import, so the flags that `datasets` and
    `huggingface_hub` consult at call time are patched (a fresh process would cost seconds of imports);
    huggingface_hub then refuses every HTTP request."""
    import huggingface_hub.constants

    for module in (datasets.config, huggingface_hub.constants):
        monkeypatch.setattr(module, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    go_offline(monkeypatch)


def save_images(folder: Path, images: dict[str, Image.Image]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, image in images.items():
        image.save(folder / name)
    return folder


def rgb_noise(seed: int, size: tuple[int, int] = (12, 10)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def first_pixels(ds: datasets.Dataset) -> torch.Tensor:
    return ds[0]["pixel_values"]


# --------------------------------------------------------------------------------------------- built-in digits


def test_digits_dataset_is_sklearn_digits(digits: datasets.Dataset) -> None:
    from sklearn.datasets import load_digits

    reference = load_digits()
    assert len(digits) == 1797
    assert isinstance(digits.features["image"], datasets.Image)
    assert isinstance(digits.features["label"], datasets.ClassLabel)
    assert digits.features["label"].num_classes == 10
    assert sorted(set(digits["label"])) == list(range(10))
    assert digits["label"] == reference.target.tolist()
    images = [digits[i]["image"] for i in range(0, 1797, 37)]
    assert all(im.mode == "L" and im.size == (8, 8) for im in images)
    ours = np.stack([np.asarray(im, dtype=np.float64) for im in images]) * 16.0 / 255.0
    assert np.abs(ours - reference.images[::37]).max() <= 16.0 / 255.0  # same digits, rescaled 0..16 -> 0..255
    assert ours.max() == pytest.approx(16.0) and ours.min() == 0.0
    assert ours.mean() == pytest.approx(reference.images[::37].mean(), abs=0.05)


def test_load_without_source_gives_digits() -> None:
    ds = load_image_dataset()
    assert len(ds) == 1797 and find_image_column(ds) == "image"
    with pytest.raises(ValueError, match="only the 'train' split"):
        load_image_dataset(split="test")


# ---------------------------------------------------------------------------------------------- transforms


@pytest.mark.parametrize("resolution", [16, 32])
def test_digits_transform_shape_and_range(digits: datasets.Dataset, resolution: int) -> None:
    prepared = prepare_dataset(digits, None, resolution, center_crop=True, random_flip=False)
    row = prepared[0]
    x = row["pixel_values"]
    assert x.shape == (1, resolution, resolution) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.min() == pytest.approx(-1.0)  # the digits' background is 0 -> -1
    assert x.max() > 0.5  # and the strokes are bright
    assert row["label"] == digits[0]["label"]
    assert digits.format["type"] is None  # the input dataset is left untouched


def test_forced_channels(digits: datasets.Dataset) -> None:
    gray3 = first_pixels(prepare_dataset(digits, "image", 16, channels=3))
    assert gray3.shape == (3, 16, 16)
    assert torch.equal(gray3[0], gray3[1]) and torch.equal(gray3[1], gray3[2])
    color = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]] * 2, dtype=np.uint8))  # 2x2 red | blue
    assert image_transform(2, channels=None)(color).shape == (3, 2, 2)
    gray = image_transform(2, channels=1)(color)
    assert gray.shape == (1, 2, 2)
    # ITU-R 601 luma: red 0.299 -> 76, blue 0.114 -> 29
    assert gray[0, 0, 0].item() == pytest.approx(76 / 127.5 - 1, abs=1e-6)
    assert gray[0, 0, 1].item() == pytest.approx(29 / 127.5 - 1, abs=1e-6)


def test_resize_shorter_side_then_center_crop() -> None:
    wide = np.zeros((8, 16), dtype=np.uint8)
    wide[:, 4:12] = 255  # a white middle that the center crop of the 8x8 must keep exactly
    x = image_transform(8, center_crop=True)(Image.fromarray(wide))
    assert x.shape == (1, 8, 8) and torch.all(x == 1.0)
    tall = image_transform(4, center_crop=True)(Image.fromarray(np.zeros((20, 10), dtype=np.uint8)))
    assert tall.shape == (1, 4, 4)


def test_rgb_and_grayscale_follow_the_data(tmp_path: Path, cache_dir: str) -> None:
    rgb_dir = save_images(tmp_path / "rgb", {f"{i}.png": rgb_noise(i) for i in range(3)})
    rgb = load_image_dataset(train_data_dir=str(rgb_dir), cache_dir=cache_dir)
    assert infer_channels(rgb, "image") == 3
    assert first_pixels(prepare_dataset(rgb, None, 8)).shape == (3, 8, 8)
    assert first_pixels(prepare_dataset(rgb, None, 8, channels=1)).shape == (1, 8, 8)
    gray_dir = save_images(tmp_path / "gray", {f"{i}.png": rgb_noise(i).convert("L") for i in range(3)})
    gray = load_image_dataset(str(gray_dir), cache_dir=cache_dir)
    assert infer_channels(gray, "image") == 1
    assert first_pixels(prepare_dataset(gray, None, 8)).shape == (1, 8, 8)


def test_channels_majority_vote(tmp_path: Path, cache_dir: str) -> None:
    images = {"a.png": rgb_noise(0).convert("L"), "b.png": rgb_noise(1).convert("L"), "c.png": rgb_noise(2)}
    mixed = load_image_dataset(train_data_dir=str(save_images(tmp_path / "mixed", images)), cache_dir=cache_dir)
    assert infer_channels(mixed, "image") == 1
    prepared = prepare_dataset(mixed, "image", 8)
    assert {tuple(prepared[i]["pixel_values"].shape) for i in range(3)} == {(1, 8, 8)}  # colour row converted


# ------------------------------------------------------------------------------------------- special modes


def _rgba() -> Image.Image:
    """Left half opaque red; right half fully transparent with black stored underneath."""
    array = np.zeros((8, 8, 4), dtype=np.uint8)
    array[:, :4] = (255, 0, 0, 255)
    return Image.fromarray(array)


def _palette() -> Image.Image:
    image = Image.new("P", (8, 8))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255] + [0] * (253 * 3))
    image.putdata([(i // 8) % 3 for i in range(64)])  # rows cycle red, green, blue
    return image


def _gray16() -> Image.Image:
    array = np.zeros((8, 8), dtype=np.uint16)
    array[:, 4:] = 65535
    array[0, 0] = 128 * 257  # mid gray in 16 bits
    return Image.fromarray(array)


def test_rgba_composited_on_white(tmp_path: Path, cache_dir: str) -> None:
    folder = save_images(tmp_path / "rgba", {"0.png": _rgba(), "1.png": _rgba()})
    ds = load_image_dataset(train_data_dir=str(folder), cache_dir=cache_dir)
    assert ds[0]["image"].mode == "RGBA"
    x = first_pixels(prepare_dataset(ds, None, 8))
    assert x.shape == (3, 8, 8)
    assert torch.all(x[:, :, 4:] == 1.0)  # transparent -> white, not the black stored under it
    assert torch.all(x[0, :, :4] == 1.0) and torch.all(x[1:, :, :4] == -1.0)  # opaque red kept


def test_palette_image(tmp_path: Path, cache_dir: str) -> None:
    folder = save_images(tmp_path / "palette", {"0.png": _palette()})
    ds = load_image_dataset(train_data_dir=str(folder), cache_dir=cache_dir)
    assert ds[0]["image"].mode == "P"
    x = first_pixels(prepare_dataset(ds, None, 8))
    assert x.shape == (3, 8, 8)
    assert x[:, 0, 0].tolist() == [1.0, -1.0, -1.0]  # red
    assert x[:, 1, 0].tolist() == [-1.0, 1.0, -1.0]  # green
    assert x[:, 2, 0].tolist() == [-1.0, -1.0, 1.0]  # blue


def test_gray_palette_counts_as_grayscale() -> None:
    image = Image.new("P", (4, 4))
    image.putpalette([v for i in range(256) for v in (i, i, i)])
    ds = datasets.Dataset.from_dict({"image": [image]}, features=datasets.Features({"image": datasets.Image()}))
    assert infer_channels(ds, "image") == 1


def test_16bit_grayscale(tmp_path: Path, cache_dir: str) -> None:
    folder = save_images(tmp_path / "gray16", {"0.png": _gray16(), "1.png": _gray16()})
    ds = load_image_dataset(train_data_dir=str(folder), cache_dir=cache_dir)
    assert ds[0]["image"].mode in ("I;16", "I")
    x = first_pixels(prepare_dataset(ds, None, 8))
    assert x.shape == (1, 8, 8)
    assert torch.all(x[:, :, 4:] == 1.0) and x[0, 1, 1].item() == -1.0  # full scale is 65535, not 255
    assert x[0, 0, 0].item() == pytest.approx(128 / 127.5 - 1, abs=1e-5)
    assert first_pixels(prepare_dataset(ds, None, 16, channels=3)).shape == (3, 16, 16)


def test_32bit_integer_mode_is_read_as_16bit() -> None:
    image = Image.fromarray(np.full((4, 4), 65535, dtype=np.int32))
    assert image.mode == "I"
    x = image_transform(4)(image)
    assert x.shape == (1, 4, 4) and torch.all(x == 1.0)


# ------------------------------------------------------------------------------------------------- sources


def test_save_to_disk_dataset_and_dict(digits: datasets.Dataset, tmp_path: Path) -> None:
    small = digits.select(range(20))
    small.save_to_disk(str(tmp_path / "saved"))
    ds = load_image_dataset(str(tmp_path / "saved"))
    assert len(ds) == 20 and ds.features == digits.features
    datasets.DatasetDict({"train": small, "test": digits.select(range(20, 25))}).save_to_disk(str(tmp_path / "dd"))
    assert len(load_image_dataset(str(tmp_path / "dd"))) == 20
    assert len(load_image_dataset(str(tmp_path / "dd"), split="test")) == 5
    with pytest.raises(ValueError, match="no split 'validation'.*'test', 'train'"):
        load_image_dataset(str(tmp_path / "dd"), split="validation")


def test_imagefolder_with_classes(tmp_path: Path, cache_dir: str) -> None:
    save_images(tmp_path / "folder" / "cat", {f"{i}.png": rgb_noise(i) for i in range(2)})
    save_images(tmp_path / "folder" / "dog", {f"{i}.png": rgb_noise(10 + i) for i in range(3)})
    ds = load_image_dataset(train_data_dir=str(tmp_path / "folder"), cache_dir=cache_dir)
    assert len(ds) == 5 and set(ds.column_names) == {"image", "label"}
    prepared = prepare_dataset(ds, None, 8)
    batch = collate_fn([prepared[i] for i in range(5)])
    assert batch["pixel_values"].shape == (5, 3, 8, 8)
    assert sorted(batch["labels"].tolist()) == [0, 0, 1, 1, 1] and batch["num_skipped"] == 0


def test_missing_image_column_lists_columns(digits: datasets.Dataset) -> None:
    with pytest.raises(ValueError, match=r"'photo' not found; available columns: \['image', 'label'\]"):
        load_image_dataset(image_column="photo")
    no_images = datasets.Dataset.from_dict({"text": ["a"], "score": [1]})
    with pytest.raises(ValueError, match=r"no image column found.*\['text', 'score'\]"):
        find_image_column(no_images)
    renamed = digits.select(range(3)).rename_column("image", "pic")
    assert find_image_column(renamed) == "pic"  # found by its Image feature, whatever its name


def test_empty_dataset_errors(tmp_path: Path, cache_dir: str) -> None:
    empty_dir = tmp_path / "empty_folder"
    empty_dir.mkdir()
    with pytest.raises(ValueError, match="empty_folder.*empty"):
        load_image_dataset(train_data_dir=str(empty_dir), cache_dir=cache_dir)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="notes.*empty"):
        load_image_dataset(train_data_dir=str(tmp_path / "notes"), cache_dir=cache_dir)
    empty = datasets.Dataset.from_dict({"image": []}, features=datasets.Features({"image": datasets.Image()}))
    empty.save_to_disk(str(tmp_path / "saved_empty"))
    with pytest.raises(ValueError, match="saved_empty is empty"):
        load_image_dataset(str(tmp_path / "saved_empty"))


def test_missing_path_errors(tmp_path: Path) -> None:
    missing = str(tmp_path / "does_not_exist")
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_image_dataset(train_data_dir=missing)
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_image_dataset(missing)
    with pytest.raises(FileNotFoundError, match=r"\./no/such/folder"):
        load_image_dataset("./no/such/folder")


def test_unreachable_hub_id_fails_fast_and_names_it(offline: None) -> None:
    """Offline, an uncached Hub id must raise at once (no retry loop), naming the id. The call runs in a daemon
    thread so that a regression fails the test instead of hanging it."""
    outcome: dict[str, object] = {}

    def attempt() -> None:
        start = time.monotonic()
        try:
            load_image_dataset("nobody-xyz/no-such-dataset")
        except Exception as err:  # the type is asserted below
            outcome["error"] = err
        outcome["elapsed"] = time.monotonic() - start

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive(), "loading an unreachable Hub id hung"
    assert outcome["elapsed"] < 5.0
    error = outcome["error"]
    assert isinstance(error, ConnectionError)
    assert "'nobody-xyz/no-such-dataset'" in str(error) and "HF_HUB_OFFLINE is set" in str(error)


def test_hub_id_loads_online_then_from_cache_offline(
    hub_server, fresh_hf_cache: Path, digits: datasets.Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real `datasets.load_dataset` path, against the local Hub server (conftest points HF_ENDPOINT at it):
    online first, then offline, served from the cache that the first load filled."""
    digits.select(range(30)).push_to_hub("user/tiny-digits")
    cache = str(tmp_path / "datasets_cache")
    online = load_image_dataset("user/tiny-digits", cache_dir=cache)
    assert len(online) == 30 and online.features == digits.features
    go_offline(monkeypatch)
    cached = load_image_dataset("user/tiny-digits", cache_dir=cache)
    assert len(cached) == 30 and cached[0]["image"].size == (8, 8)
    assert cached["label"] == digits["label"][:30]


# ------------------------------------------------------------------------------------------ corrupt images


def _folder_with_corrupt_files(root: Path) -> Path:
    folder = save_images(root, {f"good{i}.png": rgb_noise(i) for i in range(4)})
    (folder / "garbage.png").write_bytes(b"this is not an image")
    good = (folder / "good0.png").read_bytes()
    (folder / "truncated.png").write_bytes(good[: len(good) // 2])
    return folder


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_files_are_skipped_and_counted(tmp_path: Path, cache_dir: str, num_workers: int) -> None:
    folder = _folder_with_corrupt_files(tmp_path / "corrupt")
    ds = load_image_dataset(train_data_dir=str(folder), cache_dir=cache_dir)  # loads lazily: no crash here
    assert len(ds) == 6
    assert infer_channels(ds, "image") == 3  # the vote ignores unreadable rows
    prepared = prepare_dataset(ds, None, 8)
    loader = torch.utils.data.DataLoader(prepared, batch_size=4, collate_fn=collate_fn, num_workers=num_workers)
    skipped, kept = SkippedImages(), 0
    for batch in loader:
        skipped.update(batch)
        kept += batch["pixel_values"].shape[0]
        assert batch["pixel_values"].shape[1:] == (3, 8, 8)
    assert (kept, skipped.count) == (4, 2)


def test_corrupt_files_skipped_when_streaming(tmp_path: Path, cache_dir: str) -> None:
    folder = _folder_with_corrupt_files(tmp_path / "corrupt")
    stream = load_image_dataset(train_data_dir=str(folder), cache_dir=cache_dir, streaming=True)
    assert isinstance(stream, datasets.IterableDataset)
    prepared = prepare_dataset(stream, None, 8, random_flip=True, seed=3)
    skipped = SkippedImages()
    batches = [collate_fn(list(prepared.take(6)))]
    assert [skipped.update(b) for b in batches] == [2] and batches[0]["pixel_values"].shape == (4, 3, 8, 8)
    set_epoch(prepared, 0)
    again = collate_fn(list(prepared.take(6)))["pixel_values"]
    assert torch.equal(again, batches[0]["pixel_values"])  # same seed & epoch -> same augmentation


def test_all_rows_unreadable_gives_empty_batch() -> None:
    batch = collate_fn([{"pixel_values": None, "label": 1}, {"pixel_values": None, "label": 2}])
    assert batch["pixel_values"].shape == (0, 0, 0, 0) and batch["num_skipped"] == 2
    assert batch["labels"].shape == (0,) and batch["labels"].dtype == torch.long


# ------------------------------------------------------------------------------------------- determinism


def _stack(ds: datasets.Dataset, indices: list[int]) -> torch.Tensor:
    return collate_fn(ds.__getitems__(indices))["pixel_values"]


def test_flip_is_deterministic_per_seed_epoch_and_row(digits: datasets.Dataset) -> None:
    small = digits.select(range(64))
    rows = list(range(64))
    plain = _stack(prepare_dataset(small, None, 8), rows)
    flipping = prepare_dataset(small, None, 8, random_flip=True, seed=7)
    first = _stack(flipping, rows)
    flipped = [not torch.equal(a, b) for a, b in zip(first, plain)]
    assert 16 < sum(flipped) < 48  # about half the rows flipped...
    for a, b, was_flipped in zip(first, plain, flipped):
        assert torch.equal(a, torch.flip(b, dims=[-1]) if was_flipped else b)  # ...and flipped means mirrored
    assert torch.equal(_stack(prepare_dataset(small, None, 8, random_flip=True, seed=7), rows), first)
    assert torch.equal(_stack(flipping, rows[::-1]), first.flip(0))  # order of fetching does not matter
    assert torch.equal(flipping[5]["pixel_values"], first[5])
    assert not torch.equal(_stack(prepare_dataset(small, None, 8, random_flip=True, seed=8), rows), first)
    set_epoch(flipping, 1)
    second = _stack(flipping, rows)
    assert not torch.equal(second, first)  # a new epoch, new flips
    set_epoch(flipping, 0)
    assert torch.equal(_stack(flipping, rows), first)  # a resumed epoch 0 sees the same flips
    resumed_at_1 = prepare_dataset(small, None, 8, random_flip=True, seed=7, epoch=1)
    assert torch.equal(_stack(resumed_at_1, rows), second)  # a run resumed at epoch 1 too


def test_random_crop_is_deterministic(tmp_path: Path) -> None:
    wide = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (8, 1)))  # 8x32 horizontal ramp
    ds = datasets.Dataset.from_dict({"image": [wide] * 32}, features=datasets.Features({"image": datasets.Image()}))
    a = prepare_dataset(ds, None, 8, center_crop=False, seed=1)
    crops = _stack(a, list(range(32)))
    assert len({round(float(c[0, 0, 0]), 4) for c in crops}) > 5  # different offsets for different rows
    assert torch.equal(_stack(prepare_dataset(ds, None, 8, center_crop=False, seed=1), list(range(32))), crops)
    assert INDEX_COLUMN not in ds.column_names  # the index column lives only on the prepared copy


# ------------------------------------------------------------------------------------- in-memory row cache


def _transform_of(ds: datasets.Dataset):
    return ds.format["format_kwargs"]["transform"]


def _count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    import hf_ddpm.data.prepare  # the module whose row transform calls decode_image

    calls: list[int] = []
    decode = hf_ddpm.data.prepare.decode_image

    def counting(value, decoder=None):
        calls.append(1)
        return decode(value, decoder)

    monkeypatch.setattr(hf_ddpm.data.prepare, "decode_image", counting)
    return calls


@pytest.mark.parametrize("random_flip", [False, True])
def test_row_cache_gives_the_same_rows_and_skips_decoding(
    digits: datasets.Dataset, monkeypatch: pytest.MonkeyPatch, random_flip: bool
) -> None:
    small, rows = digits.select(range(48)), list(range(48))
    plain = prepare_dataset(small, None, 16, random_flip=random_flip, seed=3)
    cached = prepare_dataset(small, None, 16, random_flip=random_flip, seed=3, cache_bytes=2**20)
    calls = _count_decodes(monkeypatch)
    for epoch in (0, 1, 0):
        set_epoch(plain, epoch)
        set_epoch(cached, epoch)
        expected = _stack(plain, rows)
        before = len(calls)
        assert torch.equal(_stack(cached, rows), expected)  # bit for bit, flips of each epoch included
        if epoch == 1:
            assert len(calls) - before == 0  # the second pass decodes nothing
    assert len(_transform_of(cached)._cache) == 48
    assert len(_transform_of(plain)._cache) == 0  # off by default


def test_row_cache_keeps_to_its_budget_and_hands_out_copies(digits: datasets.Dataset) -> None:
    row_bytes = 1 * 16 * 16 * 4
    cached = prepare_dataset(digits.select(range(20)), None, 16, cache_bytes=5 * row_bytes + 1)
    first = _stack(cached, list(range(20)))
    transform = _transform_of(cached)
    assert len(transform._cache) == 5 and transform._cached_bytes == 5 * row_bytes
    cached[0]["pixel_values"].fill_(7.0)  # a caller writing to its row must not reach the cache
    assert torch.equal(cached[0]["pixel_values"], first[0])


def test_row_cache_holds_only_fixed_crops() -> None:
    square = Image.fromarray(np.full((8, 8), 100, dtype=np.uint8))
    wide = Image.fromarray(np.tile(np.arange(32, dtype=np.uint8) * 8, (8, 1)))
    features = datasets.Features({"image": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": [square, wide] * 4}, features=features)
    random_crops = prepare_dataset(ds, None, 8, center_crop=False, seed=1, cache_bytes=2**20)
    first = _stack(random_crops, list(range(8)))
    assert sorted(_transform_of(random_crops)._cache) == [0, 2, 4, 6]  # the square images: any crop is the whole
    set_epoch(random_crops, 1)
    second = _stack(random_crops, list(range(8)))
    assert torch.equal(second[0::2], first[0::2]) and not torch.equal(second[1::2], first[1::2])


def test_row_cache_is_not_copied_and_bad_settings_are_refused(digits: datasets.Dataset) -> None:
    import copy
    import pickle

    cached = prepare_dataset(digits.select(range(4)), None, 8, cache_bytes=2**20)
    _stack(cached, [0, 1, 2, 3])
    transform = _transform_of(cached)
    assert len(transform._cache) == 4
    for clone in (pickle.loads(pickle.dumps(transform)), copy.deepcopy(transform)):
        assert clone._cache == {} and clone._cached_bytes == 0 and clone.cache_bytes == 2**20
    with pytest.raises(ValueError, match="cache_bytes must be >= 0, got -1"):
        prepare_dataset(digits, None, 8, cache_bytes=-1)
    with pytest.raises(ValueError, match="needs a map-style Dataset"):
        prepare_dataset(digits.to_iterable_dataset(), None, 8, cache_bytes=1024)
