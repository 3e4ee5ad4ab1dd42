"""Fréchet distances between feature distributions: FID, FD_DINOv2 and a built-in "digits-FID".

* `frechet.py`: the distance between two Gaussian fits (`frechet_distance`, `FeatureStats`), FID of image sets
  (`fid_from_images`) and cached statistics of real data (`real_stats`).
* `features.py`: the feature extractors (Inception-v3, DINOv2) and the registry naming them (`make_extractor`).
* `digits_classifier.py`: the digits CNN, its training and cache, and the real-vs-real floor.
"""

from .digits_classifier import (
    DigitsClassifierExtractor,
    digits_halves,
    digits_images,
    digits_report,
    real_vs_real_floor,
    train_digits_classifier,
)
from .features import (
    INCEPTION_WEIGHTS_ENV,
    INCEPTION_WEIGHTS_URL,
    DinoV2Extractor,
    ExtractorUnavailableError,
    FeatureExtractor,
    ImageFeatureExtractor,
    InceptionExtractor,
    check_features,
    default_cache_dir,
    make_extractor,
)
from .frechet import FeatureStats, fid_from_images, frechet_distance, real_stats

__all__ = [
    "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_WEIGHTS_URL",
    "DigitsClassifierExtractor",
    "DinoV2Extractor",
    "ExtractorUnavailableError",
    "FeatureExtractor",
    "FeatureStats",
    "ImageFeatureExtractor",
    "InceptionExtractor",
    "check_features",
    "default_cache_dir",
    "digits_halves",
    "digits_images",
    "digits_report",
    "fid_from_images",
    "frechet_distance",
    "make_extractor",
    "real_stats",
    "real_vs_real_floor",
    "train_digits_classifier",
]
