"""Feature extractors for Fréchet distances: images -> [N, D] features, and the registry that names them.

Which features is pluggable (`FeatureExtractor`); `make_extractor` builds one by name:

* `InceptionExtractor` ("inception"): the standard Inception-v3 pool3 (2048-D) of the TF-ported weights, through
  torch-fidelity (the `eval` extra). The weights are a file; with none on disk and no network it fails at once,
  naming the file.
* `DinoV2Extractor` ("dinov2[:MODEL_ID_OR_PATH]"): FD_DINOv2 (Stein et al. 2023, https://arxiv.org/abs/2306.04675),
  the CLS token of any DINOv2 checkpoint that `transformers.AutoModel` loads (Hub id or local folder).
* `DigitsClassifierExtractor` ("digits", in `digits_classifier.py`): a small CNN trained on the built-in digits.

Images everywhere are `float [N, C, H, W]` in [0, 1] with C = 1 or 3 (pipelines' [-1, 1] output: `(x + 1) / 2`).
"""

from __future__ import annotations

import importlib.util
import os
import socket
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

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


def check_images(images: torch.Tensor) -> torch.Tensor:
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
        return self._features(check_images(images).to(self.device)).float().cpu()

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


# ------------------------------------------------------------------------------------------------- registry

DEFAULT_DINOV2 = "facebook/dinov2-base"


def check_features(features: str) -> None:
    """Raise a ValueError unless `features` names an extractor `make_extractor` knows (nothing is loaded)."""
    if features not in ("digits", "inception") and features != "dinov2" and not features.startswith("dinov2:"):
        raise ValueError(
            f"Unknown features {features!r}; allowed: 'digits', 'inception', 'dinov2[:MODEL_ID_OR_PATH]'."
        )


def make_extractor(features: str, device: str | torch.device | None = None) -> ImageFeatureExtractor:
    """'digits', 'inception' or 'dinov2[:MODEL_ID_OR_PATH]' (default `DEFAULT_DINOV2`) -> its feature extractor."""
    check_features(features)
    if features == "digits":
        from .digits_classifier import DigitsClassifierExtractor  # it builds on this module

        return DigitsClassifierExtractor(device=device)
    if features == "inception":
        return InceptionExtractor(device=device)
    _, _, model = features.partition(":")
    return DinoV2Extractor(model or DEFAULT_DINOV2, device=device)
