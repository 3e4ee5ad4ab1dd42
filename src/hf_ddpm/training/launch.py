"""The run's `Accelerator`, built from the flags and the launch environment, and checked before anything is read.

`accelerate launch` (or torchrun) sets WORLD_SIZE/RANK; a plain `python train.py` runs one process. Compilation is
the trainer's own (`dynamo_kwargs`), so accelerate's is switched off here.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration, TorchDynamoPlugin

from ..compilation import compile_kwargs, compile_problem
from .errors import TrainingInputError

# Sharded-model engines: the EMA, the run signature and the pipeline export assume that every process holds the whole
# model (DDP), and the models here (35.7M parameters: ~0.6 GB with AdamW state and EMA) fit one GPU, where DDP is the
# fastest choice; sharding would only add communication.
UNSUPPORTED_DISTRIBUTED_TYPES = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def build_accelerator(args: argparse.Namespace) -> Accelerator:
    """A fresh `Accelerator` for the flags, on every process.

    Raises:
        TrainingInputError: the launched processes do not see each other, the accelerate mode shards the model, or
            the --dynamo_backend cannot compile here.
    """
    output_dir = Path(args.output_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate keeps its state (mixed precision, ...) per process; reset it so that train() can be called again
    # in one process with other flags (the demo, benchmarks, tests). The process group (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        # `accelerate launch --multi_gpu` on a machine without GPUs would run every process alone (accelerate picks
        # gloo on CPU only when told `cpu=True`), so several launched processes and no accelerator mean CPU DDP.
        cpu=world_size > 1 and not _has_accelerator(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dynamo_plugin=TorchDynamoPlugin(backend="no"),  # the trainer compiles (see `dynamo_kwargs`)
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(
            project_dir=os.fspath(output_dir), logging_dir=os.fspath(output_dir / args.logging_dir)
        ),
    )
    if accelerator.num_processes != world_size:
        raise TrainingInputError(
            f"{world_size} processes were launched, but accelerate sees {accelerator.num_processes}: each would "
            "train alone and they would overwrite each other's output. Check the `accelerate launch` flags."
        )
    check_distributed_type(accelerator.distributed_type)
    dynamo = dynamo_kwargs(args)
    problem = compile_problem(dynamo["backend"], accelerator.device) if dynamo is not None else None
    if problem is not None:
        raise TrainingInputError(f"--dynamo_backend {dynamo['backend']}: {problem}")
    return accelerator


def dynamo_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """torch.compile's arguments from --dynamo_backend / --dynamo_mode, else from accelerate's launch settings
    (ACCELERATE_DYNAMO_*, read by its TorchDynamoPlugin); None when compilation is off."""
    plugin = TorchDynamoPlugin(backend=args.dynamo_backend, mode=args.dynamo_mode)
    backend = plugin.backend.value.lower()
    if backend == "no":
        return None
    try:
        return compile_kwargs(backend, plugin.mode, bool(plugin.fullgraph), plugin.dynamic)
    except ValueError as err:
        raise TrainingInputError(f"--dynamo_mode: {err}") from err


def check_distributed_type(distributed_type: DistributedType) -> None:
    """Raise TrainingInputError for an accelerate mode whose sharded model the trainer cannot hold (see above)."""
    if distributed_type in UNSUPPORTED_DISTRIBUTED_TYPES:
        raise TrainingInputError(
            f"accelerate's {distributed_type.value} mode is not supported: hf_ddpm's EMA, checkpoints and pipeline "
            "export need every process to hold the whole model. Use DDP (`accelerate launch --multi_gpu`, or "
            "`distributed_type: MULTI_GPU` in the accelerate config); see docs/scale.md."
        )


def _has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as the trackers' `init_trackers(config=...)` accepts them (TensorBoard hparams: scalars and
    strings only)."""
    plain = (int, float, str, bool)
    return {k: v if isinstance(v, plain) else json.dumps(v) for k, v in vars(args).items()}
