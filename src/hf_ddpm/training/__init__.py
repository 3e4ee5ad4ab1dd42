"""Training DDPMs with accelerate: flags (`args`), the loop (`loop`), checkpoints, model card and Hub push.

`python train.py ...` or `accelerate launch train.py ...` runs `main`; `train(parse_args([...]))` does the same
from Python.
"""

from .args import TRAINING_PRESETS, build_parser, parse_args
from .command import main
from .errors import TrainingDiverged, TrainingInputError
from .loop import TrainResult, train

__all__ = [
    "TRAINING_PRESETS",
    "TrainResult",
    "TrainingDiverged",
    "TrainingInputError",
    "build_parser",
    "main",
    "parse_args",
    "train",
]
