"""The built-in "digits-FID": a small CNN trained on the package's 8×8 digits, and the features it gives.

Inception on 8×8 digits upscaled to 299 says little; a classifier of the data itself does, and also reports class
balance and confidence (`digits_report`). The CNN is trained deterministically by the package
(`train_digits_classifier`) and cached as safetensors. `real_vs_real_floor` (two halves of the real digits) is the
yardstick for "as good as the data itself".
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic_files import atomic_path
from .features import FeatureExtractor, ImageFeatureExtractor, check_images, default_cache_dir
from .frechet import fid_from_images


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in digits (`data.digits_dataset`, the data the demo trains on): images float32 [1797, 1, 8, 8] in
    [0, 1] and labels int64 [1797]. Fresh tensors each call (decoded once per process: decoding the images is slow)."""
    pixels, labels = _digits_arrays()
    return torch.from_numpy(pixels.copy()), torch.from_numpy(labels.copy())


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from ..data import digits_dataset

    ds = digits_dataset()
    pixels = np.stack([np.asarray(image, dtype=np.float32) for image in ds["image"]]) / 255.0
    return pixels[:, None], np.asarray(ds["label"], dtype=np.int64)


# Everything that decides the trained weights; its hash names the cached file, so changing any of it retrains.
_DIGITS_RECIPE: dict[str, Any] = {
    "version": 1,
    "arch": "conv16-conv32-pool-fc64-fc10",
    "split_seed": 0,
    "held_out_fraction": 0.2,
    "seed": 0,
    "epochs": 20,
    "batch_size": 128,
    "lr": 3e-3,
    "weight_decay": 1e-4,
    "shift_augment": 1,
}


@functools.lru_cache(maxsize=16)
def _unbilinear(n: int) -> torch.Tensor:
    """float64 [8, n]: the pseudo-inverse of 1-D bilinear up-scaling 8 -> n (align_corners=False, which is also what
    PIL's bilinear resize computes when enlarging), so `_unbilinear(n) @ upscale(x) == x` for x of length 8."""
    eye = torch.eye(8, dtype=torch.float64).view(8, 1, 8)
    up = F.interpolate(eye, size=n, mode="linear", align_corners=False)[:, 0, :].T  # [n, 8]; column j = upscaled e_j
    return torch.linalg.pinv(up)


def _recipe_hash(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


class _DigitsNet(nn.Module):
    """8×8 gray -> 10 logits; `features` is the 64-D penultimate layer (post-ReLU, like Inception's pool3)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64),
            nn.ReLU(),
        )
        self.head = nn.Linear(64, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, 1, 8, 8] in [0, 1] -> [N, 64]."""
        return self.body(x * 2.0 - 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _digits_split(n: int, recipe: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed (train, held-out) index split."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(recipe["split_seed"]))
    n_held = int(round(n * recipe["held_out_fraction"]))
    return perm[n_held:], perm[:n_held]


@contextmanager
def _deterministic_cpu() -> Iterator[None]:
    """One thread + deterministic kernels, restored afterwards: the same weights whatever the core count."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det)
        torch.set_num_threads(threads)


def _shift(x: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Random integer translations by up to `max_shift` px with zero fill: generated digits are rarely centred
    exactly as the data, and the features should not call a one-pixel offset a different distribution."""
    if max_shift == 0:
        return x
    p = max_shift
    padded = F.pad(x, (p, p, p, p))
    dy, dx = torch.randint(0, 2 * p + 1, (2, x.shape[0]), generator=generator)
    out = torch.empty_like(x)
    for oy in range(2 * p + 1):  # (2p+1)² vectorised crops rather than one per image
        for ox in range(2 * p + 1):
            sel = (dy == oy) & (dx == ox)
            out[sel] = padded[sel, :, oy : oy + 8, ox : ox + 8]
    return out


def train_digits_classifier(recipe: dict[str, Any] | None = None) -> tuple[nn.Module, float]:
    """Train the digits CNN from scratch on CPU; returns (model in eval mode, held-out accuracy).

    Deterministic: fixed split, seeded init/shuffle/augmentation through private generators (the global RNG is left
    as it was), one thread and `torch.use_deterministic_algorithms`, so two calls give bitwise-identical weights.
    """
    recipe = dict(_DIGITS_RECIPE if recipe is None else recipe)
    images, labels = digits_images()
    train_idx, held_idx = _digits_split(len(labels), recipe)
    with _deterministic_cpu(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe["seed"])  # parameter init draws from the global RNG; fork_rng restores it
        model = _DigitsNet()
        gen = torch.Generator().manual_seed(recipe["seed"])
        opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], weight_decay=recipe["weight_decay"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe["epochs"])
        x_train, y_train = images[train_idx], labels[train_idx]
        for _ in range(recipe["epochs"]):
            model.train()
            for batch in torch.randperm(len(y_train), generator=gen).split(recipe["batch_size"]):
                x = _shift(x_train[batch], gen, recipe["shift_augment"])
                loss = F.cross_entropy(model(x), y_train[batch])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            sched.step()
        model.eval()
        with torch.inference_mode():
            accuracy = (model(images[held_idx]).argmax(1) == labels[held_idx]).float().mean().item()
    return model, accuracy


class DigitsClassifierExtractor(ImageFeatureExtractor):
    """ "digits-FID" features: the 64-D penultimate layer of the built-in digits CNN ([N, 64]).

    The CNN is trained once (`train_digits_classifier`) and cached as `<cache_dir>/digits_classifier/<recipe
    hash>.safetensors` (default `$HF_HOME/hf_ddpm`), with its held-out accuracy in the file's metadata
    (`self.held_out_accuracy`). Inputs of any resolution are converted to the digits' own form: RGB -> luma (ITU-R
    601, as `data.py`), [0, 1] standing for the digits' 0..16 ink scale, and H×W -> 8×8 by the least-squares inverse
    of the bilinear up-scaling that `data.py` applies when a model trains at that resolution (`_unbilinear`).
    Why not area or bilinear down-scaling: real digits taken 8 -> 32 -> 8 that way are blurred, and their FD to the
    originals lies far above the real-vs-real floor, so a perfect generator would score badly; through the inverse
    the round trip is exact up to uint8 rounding (tests/test_fid.py checks it against the floor).
    """

    def __init__(self, cache_dir: str | os.PathLike | None = None, device: str | torch.device | None = None) -> None:
        from safetensors.torch import load_file, save_file

        self.device = torch.device(device or "cpu")
        recipe_hash = _recipe_hash(_DIGITS_RECIPE)
        self.name = f"digits-classifier-{recipe_hash}"
        self.path = Path(cache_dir or default_cache_dir()) / "digits_classifier" / f"{recipe_hash}.safetensors"
        self.model = _DigitsNet()
        self.loaded_from_cache = self.path.is_file()
        if self.loaded_from_cache:
            from safetensors import safe_open

            self.model.load_state_dict(load_file(self.path))
            with safe_open(self.path, framework="pt") as f:
                self.held_out_accuracy = float(f.metadata()["held_out_accuracy"])
        else:
            trained, self.held_out_accuracy = train_digits_classifier(_DIGITS_RECIPE)
            self.model.load_state_dict(trained.state_dict())
            metadata = {"recipe": json.dumps(_DIGITS_RECIPE), "held_out_accuracy": repr(self.held_out_accuracy)}
            with atomic_path(self.path) as tmp:
                save_file(self.model.state_dict(), tmp, metadata=metadata)
        self.model.to(self.device).eval()

    @staticmethod
    def to_digits(images: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] -> [N, 1, 8, 8] in [0, 1], the classifier's input (see the class docstring)."""
        if images.shape[1] == 3:
            weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype)
            images = (images * weights.view(1, 3, 1, 1)).sum(1, keepdim=True)
        h, w = images.shape[-2:]
        if h >= 8 and w >= 8:
            down_h, down_w = (_unbilinear(n).to(images.device, images.dtype) for n in (h, w))
            images = down_h @ images @ down_w.T
        else:
            images = F.interpolate(images, size=(8, 8), mode="bilinear", align_corners=False)
        return images.clamp(0.0, 1.0)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.features(self.to_digits(images))

    @torch.inference_mode()
    def predict_proba(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """[N, C, H, W] in [0, 1] -> class probabilities float32 [N, 10] on the CPU."""
        out = [
            self.model(self.to_digits(check_images(b).to(self.device))).softmax(-1).cpu()
            for b in images.split(batch_size)
        ]
        return torch.cat(out)

    def report(self, images: torch.Tensor) -> dict[str, Any]:
        """Class balance and confidence of (generated) digits [N, C, H, W] in [0, 1]; see `digits_report`."""
        return self.report_probabilities(self.predict_proba(images))

    @staticmethod
    def report_probabilities(probs: torch.Tensor) -> dict[str, Any]:
        """`report` from class probabilities [N, 10] (`predict_proba`, e.g. gathered from several processes)."""
        hist = torch.bincount(probs.argmax(1), minlength=10)
        frac = hist.double() / max(len(probs), 1)
        nonzero = frac[frac > 0]
        entropy = float(-(nonzero * nonzero.log()).sum())
        return {
            "count": len(probs),
            "class_histogram": hist.tolist(),
            "classes_present": int((hist > 0).sum()),
            "balance": entropy / float(np.log(10)),  # normalised entropy: 1 = uniform over 10 classes, 0 = one class
            "max_class_fraction": float(frac.max()) if len(probs) else 0.0,
            "mean_confidence": float(probs.max(1).values.mean()) if len(probs) else 0.0,
        }


def digits_report(images: torch.Tensor, extractor: DigitsClassifierExtractor | None = None) -> dict[str, Any]:
    """What the digits classifier says about images [N, C, H, W] in [0, 1] (any resolution, 1 or 3 channels).

    Returns `count`, `class_histogram` (10 counts of predicted classes), `classes_present` (classes predicted at
    least once), `balance` (entropy of the histogram / log 10: 1 = uniform), `max_class_fraction`, and
    `mean_confidence` (mean max softmax; the real digits score ~1, mode-collapsed or noisy samples less).
    """
    return (extractor or DigitsClassifierExtractor()).report(images)


def digits_halves(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fixed random halves (898 / 899 images, [N, 1, 8, 8] in [0, 1]) of the real digits."""
    images, _ = digits_images()
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    half = len(images) // 2
    return images[perm[:half]], images[perm[half:]]


def real_vs_real_floor(
    extractor: FeatureExtractor | None = None, seed: int = 0, num_images: int | None = None
) -> float:
    """FD between the first half of `digits_halves` and (the first `num_images` of) the second: the best a generator
    of that many samples can expect against the first half (FD is biased upwards at finite N), so quality goals
    read "within k× the floor"."""
    extractor = extractor or DigitsClassifierExtractor()
    reference, other = digits_halves(seed)
    if num_images is not None and not 2 <= num_images <= len(other):
        raise ValueError(f"num_images must lie in [2, {len(other)}] (the second half's size), got {num_images}.")
    return fid_from_images(reference, other[:num_images], extractor)
