"""Fréchet distances between feature distributions: FID, FD_DINOv2 and a built-in "digits-FID".

FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) fits a Gaussian to the features of real and of generated
images and reports ‖μ₁-μ₂‖² + tr(Σ₁ + Σ₂ - 2 (Σ₁Σ₂)^½). Which features is pluggable (`FeatureExtractor`):

* `InceptionExtractor`: the standard Inception-v3 pool3 (2048-D) of the TF-ported weights, through torch-fidelity
  (the `eval` extra). The weights are a file; with none on disk and no network it fails at once, naming the file.
* `DinoV2Extractor`: FD_DINOv2 (Stein et al. 2023, https://arxiv.org/abs/2306.04675), the CLS token of any DINOv2
  checkpoint that `transformers.AutoModel` loads (Hub id or local folder).
* `DigitsClassifierExtractor`: the 64-D penultimate layer of a small CNN that the package trains, deterministically
  and in seconds, on scikit-learn's 8×8 digits (cached as safetensors). Inception on 8×8 digits upscaled to 299 says
  little; a classifier of the data itself does, and also reports class balance and confidence (`digits_report`).

Images everywhere are `float [N, C, H, W]` in [0, 1] with C = 1 or 3 (pipelines' [-1, 1] output: `(x + 1) / 2`).

FD is biased upwards for finite N, so compare only figures computed with the same extractor and similar sample sizes;
`real_vs_real_floor` (two halves of the real digits) is the yardstick for "as good as the data itself".
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .atomic_files import atomic_path

__all__ = [
    "DigitsClassifierExtractor",
    "DinoV2Extractor",
    "ExtractorUnavailableError",
    "FeatureExtractor",
    "FeatureStats",
    "ImageFeatureExtractor",
    "InceptionExtractor",
    "default_cache_dir",
    "digits_halves",
    "digits_images",
    "digits_report",
    "fid_from_images",
    "frechet_distance",
    "real_stats",
    "real_vs_real_floor",
    "train_digits_classifier",
]

Images = torch.Tensor | Iterable[torch.Tensor]


class ExtractorUnavailableError(RuntimeError):
    """A feature extractor cannot be built here (missing weights or library); the message says what to provide."""


def default_cache_dir() -> Path:
    """`$HF_HOME/hf_ddpm` (read at call time, so tests and users can redirect it), else huggingface_hub's default."""
    home = os.environ.get("HF_HOME")
    if home is None:
        from huggingface_hub import constants

        home = constants.HF_HOME
    return Path(home) / "hf_ddpm"


# ------------------------------------------------------------------------------------------- Fréchet distance


def _sqrt_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via eigh; eigenvalues below 0 are rounding noise and clip to 0."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(
    mu1: np.ndarray | torch.Tensor,
    sigma1: np.ndarray | torch.Tensor,
    mu2: np.ndarray | torch.Tensor,
    sigma2: np.ndarray | torch.Tensor,
    eps: float = 1e-6,
) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1 [D], sigma1 [D, D]) and N(mu2 [D], sigma2 [D, D]), in float64.

    tr (Σ₁Σ₂)^½ is the sum of the singular values of Σ₁^½ Σ₂^½ (its Gram matrix Σ₁^½ Σ₂ Σ₁^½ is similar to Σ₁Σ₂).
    Unlike `scipy.linalg.sqrtm(Σ₁Σ₂)` this never leaves the reals, so there is no imaginary part to discard, and a
    singular Σ (N < D features) needs no inverse. Taking singular values of Σ₁^½ Σ₂^½ rather than eigenvalues of the
    Gram matrix avoids squaring: small components keep absolute accuracy ~1e-16·‖Σ‖, so FD(P, P) is 0 to ~1e-12
    relative or better. Only if an eigen/SVD solver fails to converge is `eps`·I added to both covariances (as
    pytorch-fid does).
    The result is clamped at 0 (FD ≥ 0; a -1e-13 is rounding).
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(_numpy(m), dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(_numpy(s), dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {sigma1.shape} / {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("frechet_distance got non-finite means or covariances")
    sigma1, sigma2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2  # covariances are symmetric up to rounding
    with _one_blas_thread():
        try:
            tr_covmean = _trace_sqrt_product(sigma1, sigma2)
        except np.linalg.LinAlgError:
            jitter = eps * np.eye(mu1.size)
            tr_covmean = _trace_sqrt_product(sigma1 + jitter, sigma2 + jitter)
    diff = mu1 - mu2
    return max(float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean), 0.0)


def _one_blas_thread() -> AbstractContextManager[Any]:
    """Single-threaded BLAS (when threadpoolctl, which scikit-learn brings, is there): the same bits run to run, and no
    spinning thread pools on a shared machine, where a 512-D FD took 17 s threaded vs 0.4 s on one thread (2 busy
    cores). D = 2048 (Inception) takes ~10 s on one busy core, small next to extracting the features."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr (Σ₁Σ₂)^½ for symmetric PSD Σ₁, Σ₂ [D, D]."""
    return float(np.linalg.svd(_sqrt_psd(sigma1) @ _sqrt_psd(sigma2), compute_uv=False).sum())


def _numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else x


@dataclass
class FeatureStats:
    """Gaussian fit of features: `mean` float64 [D], `cov` float64 [D, D] (unbiased, N-1), `count` = N."""

    mean: np.ndarray
    cov: np.ndarray
    count: int

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray) -> FeatureStats:
        """features: [N, D], N ≥ 2; accumulated in float64 (float32 covariances of 2048-D features lose digits)."""
        x = np.asarray(_numpy(features), dtype=np.float64)
        if x.ndim != 2 or x.shape[0] < 2:
            raise ValueError(f"need features [N, D] with N >= 2, got {x.shape}")
        return cls(mean=x.mean(axis=0), cov=np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]), count=x.shape[0])

    def frechet_distance(self, other: FeatureStats) -> float:
        """FD between this fit and `other`."""
        return frechet_distance(self.mean, self.cov, other.mean, other.cov)

    def save(self, path: str | os.PathLike) -> None:
        """Write an .npz (mean, cov, count) atomically, so concurrent writers (xdist workers) never tear a file."""
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, mean=self.mean, cov=self.cov, count=np.int64(self.count))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStats:
        with np.load(path) as data:
            return cls(mean=data["mean"], cov=data["cov"], count=int(data["count"]))


# ------------------------------------------------------------------------------------------ feature extractors


@runtime_checkable
class FeatureExtractor(Protocol):
    """Images -> features. `name` identifies the features (it keys cached real statistics)."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [N, C, H, W] in [0, 1], C = 1 or 3 -> float32 [N, D] on the CPU."""
        ...

    def extract(self, images: Images, batch_size: int = 256) -> torch.Tensor:
        """A tensor [N, C, H, W] or an iterable of batches [B, C, H, W] -> float32 [N, D] on the CPU."""
        ...


def _check_images(images: torch.Tensor) -> torch.Tensor:
    """Validate [N, C, H, W] in [0, 1] (small overshoot clamped) and return float32."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be [N, C, H, W] with C = 1 or 3, got {tuple(images.shape)}")
    images = images.float()
    if images.numel() and (images.min() < -0.01 or images.max() > 1.01):  # [-1, 1] passed by mistake
        raise ValueError("images must lie in [0, 1]; convert pipeline outputs in [-1, 1] with (x + 1) / 2")
    return images.clamp(0.0, 1.0)


def _batches(images: Images, batch_size: int) -> Iterator[torch.Tensor]:
    """Re-batch a tensor [N, C, H, W] or an iterable of [B, C, H, W] / [C, H, W] into chunks of `batch_size`."""
    if isinstance(images, torch.Tensor):
        yield from images.split(batch_size)
        return
    pending: list[torch.Tensor] = []
    count = 0
    for item in images:
        item = item.unsqueeze(0) if item.ndim == 3 else item
        pending.append(item)
        count += item.shape[0]
        while count >= batch_size:
            joined = torch.cat(pending)
            yield joined[:batch_size]
            pending, count = [joined[batch_size:]], count - batch_size
    if count:
        yield torch.cat(pending)


class ImageFeatureExtractor:
    """Shared plumbing: validation, device, batching. Subclasses set `name` and implement `_features`."""

    name: str = "base"
    device: torch.device = torch.device("cpu")

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        """images: float32 [N, C, H, W] in [0, 1] on `self.device` -> [N, D]."""
        raise NotImplementedError

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [N, C, H, W] in [0, 1], C = 1 or 3 -> float32 [N, D] on the CPU."""
        return self._features(_check_images(images).to(self.device)).float().cpu()

    def extract(self, images: Images, batch_size: int = 256) -> torch.Tensor:
        """A tensor [N, C, H, W] or an iterable of batches -> float32 [N, D] on the CPU."""
        out = [self(batch) for batch in _batches(images, batch_size)]
        if not out:
            raise ValueError("no images to extract features from")
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _to_rgb(images: torch.Tensor) -> torch.Tensor:
    """[N, 1|3, H, W] -> [N, 3, H, W]: gray is repeated, as the ImageNet networks expect."""
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


# ----------------------------------------------------------------------------------------------- Inception-v3

INCEPTION_WEIGHTS_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_WEIGHTS_ENV = "HF_DDPM_INCEPTION_WEIGHTS"
_TRUE = {"1", "on", "yes", "true"}


def _offline() -> bool:
    return any(os.environ.get(var, "").strip().lower() in _TRUE for var in ("HF_HUB_OFFLINE", "HF_DDPM_OFFLINE"))


class InceptionExtractor(ImageFeatureExtractor):
    """Standard FID features: Inception-v3 pool3 [N, 2048] of the TF 2015-12-05 weights, via torch-fidelity.

    Weights are looked up, in order: `weights_path`, `$HF_DDPM_INCEPTION_WEIGHTS`, then torch.hub's cache
    (`$TORCH_HOME/hub/checkpoints/<file name of weights_url>`, where torch-fidelity itself would put them). If none
    exists, they are downloaded from `weights_url` unless offline (`allow_download=False`, or `HF_HUB_OFFLINE=1`);
    a short TCP probe (`connect_timeout` s) runs first so that no network means an error in seconds, not a hang.
    Every failure is an `ExtractorUnavailableError` that names what is missing and how to provide it.

    Images are quantised to uint8 (round(255·x)) as FID's reference code sees PNGs; gray is repeated to RGB.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        *,
        weights_url: str = INCEPTION_WEIGHTS_URL,
        allow_download: bool | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.name = "inception-v3-pool3"
        self.device = torch.device(device or "cpu")
        path = self._resolve_weights(weights_path, weights_url, allow_download, connect_timeout)
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except Exception as err:  # ImportError, or RuntimeError from a torchvision built for another torch
            raise ExtractorUnavailableError(
                f"InceptionExtractor needs torch-fidelity (and a torchvision matching torch {torch.__version__}): "
                f"pip install 'hf-ddpm[eval]' ({type(err).__name__}: {err})"
            ) from err
        self.model = FeatureExtractorInceptionV3(self.name, ["2048"], feature_extractor_weights_path=str(path))
        self.model.to(self.device)

    @staticmethod
    def _resolve_weights(
        weights_path: str | os.PathLike | None, url: str, allow_download: bool | None, connect_timeout: float
    ) -> Path:
        """An existing weights file, downloading it only when allowed and reachable (see the class docstring)."""
        filename = os.path.basename(urllib.parse.urlparse(url).path)
        hub_path = Path(torch.hub.get_dir()) / "checkpoints" / filename
        explicit = weights_path or os.environ.get(INCEPTION_WEIGHTS_ENV)
        if explicit:
            if not Path(explicit).is_file():
                raise ExtractorUnavailableError(f"Inception weights file not found: {explicit}")
            return Path(explicit)
        if hub_path.is_file():
            return hub_path
        library = "" if importlib.util.find_spec("torch_fidelity") else " Also: pip install 'hf-ddpm[eval]'."
        how = (
            f"Inception-v3 FID weights {filename!r} are not on this machine. Provide them with "
            f"InceptionExtractor(weights_path=...), ${INCEPTION_WEIGHTS_ENV}=/path/to/{filename}, or by copying the "
            f"file to {hub_path} (torch.hub's cache; get it from {url}).{library}"
        )
        if allow_download is False or (allow_download is None and _offline()):
            raise ExtractorUnavailableError(f"{how} Downloads are off (allow_download=False or HF_HUB_OFFLINE=1).")
        host = urllib.parse.urlparse(url)
        try:  # a bounded probe: no route / no DNS must fail in seconds, not after urllib's unbounded retries
            port = host.port or (80 if host.scheme == "http" else 443)
            socket.create_connection((host.hostname, port), timeout=connect_timeout).close()
        except OSError as err:
            raise ExtractorUnavailableError(f"{how} Cannot reach {host.hostname}: {err}") from err
        hub_path.parent.mkdir(parents=True, exist_ok=True)
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(max(connect_timeout, 30.0))  # a stalled transfer raises instead of hanging
        try:
            torch.hub.download_url_to_file(url, str(hub_path), progress=False)  # no hash check, as torch-fidelity
        except Exception as err:
            raise ExtractorUnavailableError(f"{how} Download failed: {err}") from err
        finally:
            socket.setdefaulttimeout(previous)
        return hub_path

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        x = (_to_rgb(images) * 255.0).round().to(torch.uint8)
        return self.model(x)[0]


# -------------------------------------------------------------------------------------------------- DINOv2

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoV2Extractor(ImageFeatureExtractor):
    """FD_DINOv2 features: the CLS token of the last hidden state (after the final LayerNorm), [N, hidden_size].

    `model_id_or_path` is anything `transformers.AutoModel.from_pretrained` takes (e.g. "facebook/dinov2-large", the
    FD_DINOv2 default of dgm-eval, or a local folder). Preprocessing follows dgm-eval: gray -> RGB, bicubic
    (antialiased) resize straight to `resolution`², ImageNet mean/std.
    """

    def __init__(
        self,
        model_id_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        *,
        resolution: int = 224,
        **from_pretrained_kwargs: Any,
    ) -> None:
        from transformers import AutoModel

        self.device = torch.device(device or "cpu")
        self.resolution = resolution
        self.model = AutoModel.from_pretrained(str(model_id_or_path), **from_pretrained_kwargs).to(self.device).eval()
        self.name = f"dinov2:{model_id_or_path}" + ("" if resolution == 224 else f"@{resolution}")
        self._mean = torch.tensor(_IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(_IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        size = (self.resolution, self.resolution)
        x = F.interpolate(_to_rgb(images), size=size, mode="bicubic", antialias=True, align_corners=False)
        x = ((x.clamp(0.0, 1.0) - self._mean) / self._std).to(self.model.dtype)
        return self.model(pixel_values=x).last_hidden_state[:, 0]


# ------------------------------------------------------------------------------------- digits classifier


def digits_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The built-in digits (`data.digits_dataset`, the data the demo trains on): images float32 [1797, 1, 8, 8] in
    [0, 1] and labels int64 [1797]. Fresh tensors each call (built once per process: decoding takes seconds)."""
    pixels, labels = _digits_arrays()
    return torch.from_numpy(pixels.copy()), torch.from_numpy(labels.copy())


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from .data import digits_dataset

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
    """Train the digits CNN from scratch on CPU (a few seconds); returns (model in eval mode, held-out accuracy).

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
    originals is ~51 (area) / ~90 (antialiased bilinear), 30-50× the real-vs-real floor of ~1.7, so a perfect
    generator would score badly; through the inverse the round trip is exact to uint8 rounding (FD ~0.001).
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
            self.model(self.to_digits(_check_images(b).to(self.device))).softmax(-1).cpu()
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


# -------------------------------------------------------------------------------------------- FID and caching


def _stats(images: Images | FeatureStats, extractor: FeatureExtractor, batch_size: int) -> FeatureStats:
    if isinstance(images, FeatureStats):
        return images
    return FeatureStats.from_features(extractor.extract(images, batch_size=batch_size))


def fid_from_images(
    real: Images | FeatureStats, fake: Images | FeatureStats, extractor: FeatureExtractor, batch_size: int = 256
) -> float:
    """FD between `real` and `fake` in `extractor`'s feature space. Each side is images ([N, C, H, W] in [0, 1], or
    an iterable of such batches) or precomputed `FeatureStats` (e.g. from `real_stats`)."""
    return _stats(real, extractor, batch_size).frechet_distance(_stats(fake, extractor, batch_size))


def _slug(text: str) -> str:
    """A file-name-safe form of `text`, with a hash so that distinct keys never collide after sanitising."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")[:80]
    return f"{safe}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def real_stats(
    dataset_key: str,
    extractor: FeatureExtractor,
    images_fn: Callable[[], Images],
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
) -> FeatureStats:
    """Statistics of the real data, computed once: cached at `<cache_dir>/fid_stats/<extractor.name>--<dataset_key>
    .npz` (default `$HF_HOME/hf_ddpm`). `images_fn` is called only on a cache miss. `dataset_key` must change when
    the data or its preprocessing does (e.g. "digits@32" or "user/ds:train@64")."""
    path = Path(cache_dir or default_cache_dir()) / "fid_stats" / f"{_slug(extractor.name)}--{_slug(dataset_key)}.npz"
    if path.is_file():
        return FeatureStats.load(path)
    stats = FeatureStats.from_features(extractor.extract(images_fn(), batch_size=batch_size))
    stats.save(path)
    return stats


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
