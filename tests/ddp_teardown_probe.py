"""`train.py` that also reports, on each process, how many DistributedDataParallel wrappers are alive when accelerate's
`end_training` destroys the process group (tests/test_training.py: a wrapper alive then can deadlock the exit)."""

import gc
import sys

import accelerate
import torch

from hf_ddpm.training import main

_end_training = accelerate.Accelerator.end_training


def _counting_end_training(self: accelerate.Accelerator) -> None:
    gc.collect()
    alive = sum(isinstance(obj, torch.nn.parallel.DistributedDataParallel) for obj in gc.get_objects())
    print(f"DDP wrappers alive at end_training: {alive}", file=sys.stderr, flush=True)
    _end_training(self)


if __name__ == "__main__":
    accelerate.Accelerator.end_training = _counting_end_training
    main()
