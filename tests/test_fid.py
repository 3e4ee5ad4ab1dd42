"""Tests for hf_ddpm.fid: the Fréchet distance, stats caching, and the three feature extractors (all offline)."""

from __future__ import annotations

import importlib.util
import socket
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from hf_ddpm import fid
from hf_ddpm.data import image_transform

# --------------------------------------------------------------------------------------------- Fréchet distance


def _random_cov(rng: np.random.Generator, d: int, n: int) -> np.ndarray:
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d)
    return np.cov(x, rowvar=False)


def test_frechet_distance_diagonal_closed_form() -> None:
    """N(μ₁, diag a) vs N(μ₂, diag b): ‖μ₁-μ₂‖² + Σ (√a - √b)²."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=16), rng.normal(size=16)
    a, b = rng.uniform(0.01, 5.0, size=16), rng.uniform(0.01, 5.0, size=16)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = fid.frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)
    assert fid.frechet_distance(torch.tensor(mu1), torch.tensor(np.diag(a)), mu2, np.diag(b)) == pytest.approx(got)


def test_frechet_distance_matches_sqrtm_and_is_symmetric() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=24), rng.normal(size=24)
    s1, s2 = _random_cov(rng, 24, 100), _random_cov(rng, 24, 100)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * covmean)
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
    assert fid.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("n, d", [(500, 64), (40, 128)])  # full-rank and singular (N < D) covariances
def test_fd_of_a_set_against_itself_is_zero(n: int, d: int) -> None:
    features = torch.randn(n, d, generator=torch.Generator().manual_seed(0)) * 3 + 1
    stats = fid.FeatureStats.from_features(features)
    assert stats.frechet_distance(stats) <= 1e-6 * np.trace(stats.cov)
    other = fid.FeatureStats.from_features(features + 0.5)  # and a real difference is seen: ‖Δμ‖² = 0.25 D
    assert other.frechet_distance(stats) == pytest.approx(0.25 * d, rel=1e-6)


def test_frechet_distance_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="shape"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="non-finite"):
        fid.frechet_distance(np.array([np.nan, 0.0]), np.eye(2), np.zeros(2), np.eye(2))


def test_feature_stats_save_load(tmp_path: Path) -> None:
    stats = fid.FeatureStats.from_features(np.random.default_rng(0).normal(size=(30, 5)))
    stats.save(tmp_path / "sub" / "s.npz")
    loaded = fid.FeatureStats.load(tmp_path / "sub" / "s.npz")
    assert loaded.count == 30 and np.array_equal(loaded.mean, stats.mean) and np.array_equal(loaded.cov, stats.cov)
    assert loaded.mean.dtype == np.float64


# -------------------------------------------------------------------------------------------- digits classifier


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fid_cache")


@pytest.fixture(scope="module")
def digits_extractor(digits_cache: Path) -> fid.DigitsClassifierExtractor:
    """Trained once for the module (a few seconds), in a private cache."""
    extractor = fid.DigitsClassifierExtractor(cache_dir=digits_cache)
    assert not extractor.loaded_from_cache
    return extractor


def test_digits_classifier_accuracy_and_cache(digits_extractor: fid.DigitsClassifierExtractor) -> None:
    assert digits_extractor.held_out_accuracy >= 0.95
    assert digits_extractor.path.is_file() and digits_extractor.path.suffix == ".safetensors"
    start = time.perf_counter()
    again = fid.DigitsClassifierExtractor(cache_dir=digits_extractor.path.parent.parent)
    assert again.loaded_from_cache and time.perf_counter() - start < 1.0  # training takes seconds; loading, ms
    assert again.held_out_accuracy == digits_extractor.held_out_accuracy and again.name == digits_extractor.name
    for a, b in zip(again.model.state_dict().values(), digits_extractor.model.state_dict().values()):
        assert torch.equal(a, b)


def test_digits_classifier_training_is_deterministic(digits_extractor: fid.DigitsClassifierExtractor) -> None:
    rng_state = torch.get_rng_state()
    model, accuracy = fid.train_digits_classifier()
    assert torch.equal(torch.get_rng_state(), rng_state)  # the caller's global RNG is untouched
    assert accuracy == digits_extractor.held_out_accuracy
    trained, cached = model.state_dict(), digits_extractor.model.state_dict()
    assert trained.keys() == cached.keys() and all(torch.equal(trained[k], cached[k]) for k in trained)


def test_real_vs_real_floor_far_below_noise(digits_extractor: fid.DigitsClassifierExtractor) -> None:
    floor = fid.real_vs_real_floor(digits_extractor)
    real, _ = fid.digits_images()
    noise = torch.rand(900, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    noise_fd = fid.fid_from_images(real, noise, digits_extractor)
    print(f"digits real-vs-real floor {floor:.4f}, real-vs-noise {noise_fd:.2f}")
    assert 0 < floor < 5.0 and noise_fd > 20 * floor
    assert fid.fid_from_images(real, real, digits_extractor) <= 1e-6 * noise_fd


def test_floor_grows_as_the_sample_shrinks(digits_extractor: fid.DigitsClassifierExtractor) -> None:
    """FD's finite-sample bias: the floor for 128 images lies above the one for the whole half; bad sizes fail."""
    full, small = fid.real_vs_real_floor(digits_extractor), fid.real_vs_real_floor(digits_extractor, num_images=128)
    assert full < small < 20 * full
    reference, other = fid.digits_halves()
    assert len(reference) + len(other) == len(fid.digits_images()[0]) and len(other) - len(reference) == 1
    for bad in (1, len(other) + 1):
        with pytest.raises(ValueError, match=rf"num_images must lie in \[2, {len(other)}\].*got {bad}"):
            fid.real_vs_real_floor(digits_extractor, num_images=bad)


def test_digits_features_see_through_training_resolution(digits_extractor: fid.DigitsClassifierExtractor) -> None:
    """Digits as a model trained at 32×32 sees them (data.py's bilinear up-scaling, RGB) give the 8×8 features back."""
    real, _ = fid.digits_images()
    transform = image_transform(32, channels=3)
    pil = [PIL.Image.fromarray(np.round(x[0].numpy() * 255).astype(np.uint8)) for x in real]
    up = torch.stack([(transform(im, np.random.default_rng(0)) + 1) / 2 for im in pil])  # [N, 3, 32, 32] in [0, 1]
    assert fid.DigitsClassifierExtractor.to_digits(up).sub(real).abs().max() < 0.01
    assert fid.fid_from_images(real, up, digits_extractor) < 0.05 * fid.real_vs_real_floor(digits_extractor)


def test_digits_report(digits_extractor: fid.DigitsClassifierExtractor) -> None:
    real, _ = fid.digits_images()
    report = fid.digits_report(real, digits_extractor)
    assert report["count"] == len(real) and sum(report["class_histogram"]) == len(real)
    assert report["classes_present"] == 10 and report["balance"] > 0.95 and report["mean_confidence"] > 0.9
    noise = fid.digits_report(torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)), digits_extractor)
    assert noise["mean_confidence"] < report["mean_confidence"] - 0.15
    assert noise["balance"] < 0.8 and noise["max_class_fraction"] > 0.3


def test_extract_batching_and_validation(digits_extractor: fid.DigitsClassifierExtractor) -> None:
    real, _ = fid.digits_images()
    whole = digits_extractor.extract(real[:50], batch_size=16)
    pieces = digits_extractor.extract([real[:7], real[7:30], *real[30:50]], batch_size=16)  # uneven batches, [C,H,W]
    assert whole.shape == (50, 64) and torch.allclose(whole, pieces, atol=1e-6)
    assert torch.allclose(digits_extractor(real[:5].expand(-1, 3, -1, -1)), whole[:5], atol=1e-5)  # gray RGB == gray
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        digits_extractor(real[:5] * 2 - 1)
    with pytest.raises(ValueError, match="C = 1 or 3"):
        digits_extractor(real[:5, 0])
    assert isinstance(digits_extractor, fid.FeatureExtractor)


def test_real_stats_computed_once(tmp_path: Path, digits_extractor: fid.DigitsClassifierExtractor) -> None:
    real, _ = fid.digits_images()
    calls: list[int] = []

    def images_fn() -> torch.Tensor:
        calls.append(1)
        return real

    first = fid.real_stats("digits@8", digits_extractor, images_fn, cache_dir=tmp_path)
    second = fid.real_stats("digits@8", digits_extractor, images_fn, cache_dir=tmp_path)
    assert len(calls) == 1 and first.count == len(real) and np.array_equal(first.cov, second.cov)
    (path,) = (tmp_path / "fid_stats").glob("*.npz")
    assert digits_extractor.name in path.name and "digits_8" in path.name
    fid.real_stats("digits@32", digits_extractor, images_fn, cache_dir=tmp_path)  # another key, another file
    assert len(calls) == 2 and len(list((tmp_path / "fid_stats").glob("*.npz"))) == 2
    assert fid.fid_from_images(first, real, digits_extractor) <= 1e-9


# ------------------------------------------------------------------------------------------------------ DINOv2


def test_dinov2_extractor_on_tiny_random_model(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8
    )
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "dinov2")
    extractor = fid.DinoV2Extractor(tmp_path / "dinov2")  # a local folder through AutoModel: the real code path
    assert extractor.name.startswith("dinov2:")
    images = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    features = extractor.extract(images, batch_size=4)
    assert features.shape == (6, 32) and features.dtype == torch.float32 and torch.isfinite(features).all()
    assert torch.allclose(extractor(images.expand(-1, 3, -1, -1)), features, atol=1e-5)
    assert fid.fid_from_images(images, images, extractor) <= 1e-6 * np.trace(
        fid.FeatureStats.from_features(features).cov
    )


# --------------------------------------------------------------------------------------------------- Inception


@pytest.fixture
def no_inception_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch.hub cache and no weights variable; returns where torch.hub would keep the weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(fid.INCEPTION_WEIGHTS_ENV, raising=False)
    return tmp_path / "torch" / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"


def test_inception_offline_fails_fast_without_network(
    no_inception_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("InceptionExtractor touched the network while offline")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    start = time.perf_counter()
    with pytest.raises(fid.ExtractorUnavailableError) as info:
        fid.InceptionExtractor()
    assert time.perf_counter() - start < 10.0
    message = str(info.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in message and str(no_inception_weights) in message
    assert fid.INCEPTION_WEIGHTS_ENV in message and "weights_path" in message and "HF_HUB_OFFLINE" in message


def test_inception_unreachable_host_fails_fast(no_inception_weights: Path) -> None:
    with socket.socket() as sock:  # a port that nothing listens on: connection refused at once
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/weights-inception-2015-12-05-6726825d.pth"
    start = time.perf_counter()
    with pytest.raises(fid.ExtractorUnavailableError, match="Cannot reach 127.0.0.1"):
        fid.InceptionExtractor(weights_url=url, allow_download=True, connect_timeout=2.0)
    assert time.perf_counter() - start < 10.0 and not no_inception_weights.exists()


def test_inception_missing_explicit_weights(tmp_path: Path) -> None:
    with pytest.raises(fid.ExtractorUnavailableError, match="not found"):
        fid.InceptionExtractor(weights_path=tmp_path / "nope.pth")


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_library_names_the_extra(tmp_path: Path) -> None:
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"")
    with pytest.raises(fid.ExtractorUnavailableError, match=r"hf-ddpm\[eval\]"):
        fid.InceptionExtractor(weights_path=weights)
