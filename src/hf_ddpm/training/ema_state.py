"""EMA state in checkpoints as safetensors: accelerate would pickle a registered object (custom_checkpoint_N.pkl),
and weights are saved and loaded as safetensors only."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file

EMA_FILE = "ema.safetensors"


def save_ema_state(ema: EMAModel, folder: str | os.PathLike) -> None:
    """Write the EMA's shadow weights and its counters (step, decay settings) to `folder/ema.safetensors`."""
    state = ema.state_dict()
    shadow = state.pop("shadow_params")
    # Copies: the trainer's shadow tensors are views of one buffer (FlatEMA), which safetensors takes for tied weights.
    tensors = {
        f"shadow.{i}": p.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for i, p in enumerate(shadow)
    }
    save_file(tensors, str(Path(folder) / EMA_FILE), metadata={"ema_state": json.dumps(state)})


def load_ema_state(ema: EMAModel, folder: str | os.PathLike) -> None:
    """Restore what `save_ema_state` wrote; raises FileNotFoundError naming the file when it is missing."""
    path = Path(folder) / EMA_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the checkpoint has no EMA state (was it trained without --use_ema?)"
        )
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        state = json.loads(f.metadata()["ema_state"])
    tensors = load_file(str(path))
    state["shadow_params"] = [tensors[f"shadow.{i}"] for i in range(len(tensors))]
    ema.load_state_dict(state)


def register_ema_checkpointing(accelerator: Accelerator, ema: EMAModel) -> None:
    """Save and load the EMA with every `accelerator.save_state` / `load_state`, as safetensors."""

    def save_hook(models, weights, output_dir):  # accelerate's save-state pre-hook signature
        if accelerator.is_main_process:
            save_ema_state(ema, output_dir)

    def load_hook(models, input_dir):
        load_ema_state(ema, input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
