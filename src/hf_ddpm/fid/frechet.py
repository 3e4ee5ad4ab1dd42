"""The Fréchet distance between two Gaussian fits of features, and FID between image sets through an extractor.

FD(N(μ₁, Σ₁), N(μ₂, Σ₂)) = ‖μ₁-μ₂‖² + tr(Σ₁ + Σ₂ - 2 (Σ₁Σ₂)^½) (Heusel et al. 2017, https://arxiv.org/abs/1706.08500),
in float64. FD is biased upwards for finite N, so compare only figures computed with the same extractor and similar
sample sizes.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic_files import atomic_path
from .features import FeatureExtractor, Images, default_cache_dir


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
    thread pools spinning against each other on a shared, busy machine, where they make these small D×D
    decompositions many times slower than one thread (docs/benchmarks.md)."""
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
