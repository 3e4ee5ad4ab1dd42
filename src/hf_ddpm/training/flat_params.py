"""The trained parameters, their gradients and their EMA as views into three flat buffers.

A small U-Net has many small tensors (182 for `tiny-16`), and on CPU every per-tensor kernel costs dispatch time
that a small tensor's arithmetic does not repay: fused AdamW, gradient clipping, zeroing the gradients and the EMA
update each launch one kernel per tensor, a sizeable share of a small model's training step. Over one buffer each is
a single kernel (what that saves is measured in docs/benchmarks.md, "Training throughput").
The module keeps its own `nn.Parameter`s (state dicts, DDP and checkpoints see the usual per-tensor names and
shapes); only their storage moves, and autograd accumulates each gradient in place into its view of the gradient
buffer, which is zeroed, never freed, between steps.

Tensors that share one storage look like tied weights to safetensors' savers and loaders (accelerate's checkpoint
writer keeps one tensor per storage; safetensors' `load_model` and `save_file` fail on channels_last views of one
storage), so checkpoints go through `register_flat_checkpointing`, and a model to save gets weights of its own.
The optimizer's state is saved per parameter (`attach_optimizer`), as an optimizer over the module would save it.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import SAFE_WEIGHTS_NAME
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from torch import nn

__all__ = ["FlatEMA", "FlatParameters", "register_flat_checkpointing"]


def _dense_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """The tensor's strides if its memory layout is contiguous or channels_last (a view into a flat buffer keeps
    that layout, so convolutions see weights as before), else the contiguous strides of its shape."""
    if tensor.is_contiguous() or (tensor.ndim == 4 and tensor.is_contiguous(memory_format=torch.channels_last)):
        return tensor.stride()
    strides, step = [], 1
    for size in reversed(tensor.shape):
        strides.append(step)
        step *= max(size, 1)
    return tuple(reversed(strides))


class FlatParameters:
    """`parameters` (float tensors on one device) re-seated as views into one buffer, and their gradients as views
    into another. `param` is a single `nn.Parameter` over the whole buffer, with the whole gradient buffer as its
    `grad`: hand it to the optimizer and to gradient clipping instead of the module's parameters.

    Call `zero_grad()` instead of the optimizer's (which would set `param.grad` to None); the module's parameters must
    keep their gradients (no `zero_grad(set_to_none=True)` on the module), which `zero_grad()` checks.
    """

    def __init__(self, parameters: Iterable[nn.Parameter]):
        self.params = list(parameters)
        if not self.params:
            raise ValueError("FlatParameters needs at least one parameter")
        first = self.params[0]
        for p in self.params:
            if p.dtype != first.dtype or p.device != first.device or not p.requires_grad:
                raise ValueError(
                    f"FlatParameters needs trainable parameters of one dtype and device; got {p.dtype} on {p.device} "
                    f"(requires_grad={p.requires_grad}) next to {first.dtype} on {first.device}"
                )
        self._layout = [(p.shape, _dense_strides(p)) for p in self.params]
        self._offsets = []
        total = 0
        for p in self.params:
            self._offsets.append(total)
            total += p.numel()
        self.data = torch.empty(total, dtype=first.dtype, device=first.device)
        self.grad = torch.zeros_like(self.data)
        with torch.no_grad():
            for p, view, grad_view in zip(self.params, self.views(self.data), self.views(self.grad)):
                view.copy_(p)
                p.data = view
                p.grad = grad_view
        self._pointers = [(p.data_ptr(), p.grad.data_ptr()) for p in self.params]
        self.param = nn.Parameter(self.data)
        self.param.grad = self.grad

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        """Views into a flat `buffer` (`[N]`, N = total parameter count) shaped and strided like each parameter."""
        if buffer.ndim != 1 or buffer.numel() != self.data.numel():
            raise ValueError(
                f"expected a flat buffer of {self.data.numel()} elements, got shape {tuple(buffer.shape)}"
            )
        return [
            buffer.as_strided(shape, strides, offset) for (shape, strides), offset in zip(self._layout, self._offsets)
        ]

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Give `optimizer` (over `param` alone) the state dict of an optimizer over the module's parameters: one entry
        per parameter, each state tensor in its parameter's shape. The flat order depends on the memory layout (NCHW
        and channels_last order a conv weight's elements differently), so flat moments saved under one layout would
        land on the wrong elements under the other; per-parameter state is the same either way, and is what
        checkpoints written before the flat buffers hold."""
        optimizer.register_state_dict_post_hook(self._expand_optimizer_state)
        optimizer.register_load_state_dict_pre_hook(self._flatten_optimizer_state)

    def _expand_optimizer_state(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        (group,) = state_dict["param_groups"]
        flat_state = state_dict["state"].get(group["params"][0], {})
        per_param: dict[int, dict] = {i: {} for i in range(len(self.params))} if flat_state else {}
        for key, value in flat_state.items():
            if torch.is_tensor(value) and value.shape == self.data.shape:
                parts = [view.clone(memory_format=torch.contiguous_format) for view in self.views(value)]
            else:  # e.g. AdamW's step count: one per parameter, as a per-tensor optimizer keeps it
                parts = [value.clone() if torch.is_tensor(value) else value for _ in self.params]
            for i, part in enumerate(parts):
                per_param[i][key] = part
        return {"state": per_param, "param_groups": [{**group, "params": list(range(len(self.params)))}]}

    def _flatten_optimizer_state(self, optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        groups = state_dict["param_groups"]
        if len(groups) != 1 or len(groups[0]["params"]) != len(self.params):
            sizes = [len(g["params"]) for g in groups]
            raise ValueError(
                f"the optimizer state holds parameter groups of sizes {sizes}; this model trains "
                f"{len(self.params)} parameters in one group"
            )
        states = [state_dict["state"].get(i, {}) for i in groups[0]["params"]]
        if any(states) and not all(states):
            raise ValueError("the optimizer state has entries for some parameters and not for others")
        flat_state: dict = {}
        for key, value in (states[0] if states else {}).items():
            if key != "step" and all(
                torch.is_tensor(s[key]) and s[key].shape == p.shape for s, p in zip(states, self.params)
            ):
                buffer = torch.empty(self.data.shape, dtype=value.dtype, device=self.data.device)
                for view, state in zip(self.views(buffer), states):
                    view.copy_(state[key])
                flat_state[key] = buffer
            elif all(_same(s[key], value) for s in states):
                flat_state[key] = value
            else:  # e.g. a per-tensor optimizer that skipped parameters without gradients: steps differ
                raise ValueError(
                    f"the optimizer state's {key!r} differs between parameters; one flat state cannot hold it"
                )
        return {"state": {0: flat_state} if flat_state else {}, "param_groups": [{**groups[0], "params": [0]}]}

    def zero_grad(self) -> None:
        """Zero every gradient (one fill of the buffer), after checking that each parameter and gradient is still its
        view of the buffers: one moved elsewhere (`.data` replaced, a `.to()` that copies) would drop out of training
        silently."""
        if self.param.grad is not self.grad:
            raise RuntimeError(
                "the flat parameter's gradient was replaced or set to None (e.g. by the optimizer's "
                "zero_grad(set_to_none=True)): its optimizer would skip it. Zero gradients with FlatParameters.zero_grad()."
            )
        for p, (data_pointer, grad_pointer) in zip(self.params, self._pointers):
            grad = p.grad
            if grad is None or grad.data_ptr() != grad_pointer:
                raise RuntimeError(
                    "a parameter's gradient was replaced or set to None (e.g. by zero_grad(set_to_none=True) on the "
                    "module): the flat gradient buffer would miss it. Zero gradients with FlatParameters.zero_grad()."
                )
            if p.data_ptr() != data_pointer:
                raise RuntimeError(
                    f"a parameter of shape {tuple(p.shape)} no longer lies in the flat buffer (its .data was replaced, "
                    "e.g. by a .to() that copies): the optimizer would update the buffer, not it. Move or convert the "
                    "model before building FlatParameters."
                )
        self.grad.zero_()


def _same(a: object, b: object) -> bool:
    return torch.equal(a, b) if torch.is_tensor(a) and torch.is_tensor(b) else a == b


def _unshare(state_dict: dict[str, torch.Tensor]) -> OrderedDict[str, torch.Tensor]:
    """A copy of a state dict whose tensors each own their (contiguous) memory."""
    return OrderedDict(
        (k, v.clone(memory_format=torch.contiguous_format) if torch.is_tensor(v) else v) for k, v in state_dict.items()
    )


def register_flat_checkpointing(accelerator: Accelerator) -> None:
    """Make `accelerator.save_state` / `load_state` write and read the prepared models' weights as usual
    (`model.safetensors`, `model_1.safetensors`, ...) when their parameters are views of one `FlatParameters` buffer.

    Saving: the state dicts are handed to accelerate as separate tensors. Loading: the weights are copied into the
    existing parameters here (so they stay views of the buffer) and the models are taken off accelerate's list, whose
    safetensors `load_model` cannot walk shared channels_last storage; a missing file is an error naming it.
    """

    def save_hook(models: list[nn.Module], weights: list[dict], output_dir: str) -> None:
        weights[:] = [_unshare(state) for state in weights]

    def load_hook(models: list[nn.Module], input_dir: str | os.PathLike) -> None:
        for i, model in enumerate(models):
            name = SAFE_WEIGHTS_NAME if i == 0 else SAFE_WEIGHTS_NAME.replace(".", f"_{i}.")
            path = Path(input_dir) / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} is missing: the checkpoint holds no weights for model {i}")
            # Into the very object accelerate saved from and would load into (its keys match, wrapped or not);
            # load_state_dict copies into the existing parameters, which so stay views of the buffer.
            device = next(model.parameters()).device
            model.load_state_dict(load_file(str(path), device=str(device)))
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


class FlatEMA:
    """diffusers' `EMAModel` (its decay warmup, state dict, `copy_to`) with its shadow weights as views into one
    buffer, updated by one `lerp_` over all of them: `shadow += (1 - decay) * (param - shadow)`, the update of
    `EMAModel.step`."""

    def __init__(self, ema: EMAModel, flat: FlatParameters):
        self.ema, self.flat = ema, flat
        self.shadow = torch.empty_like(flat.data)
        self._views = flat.views(self.shadow)
        self.rebind()

    def rebind(self) -> None:
        """Copy the EMA's shadow tensors into the buffer and make them its views again; call after anything that
        replaces them (`EMAModel.load_state_dict`, a `to()` that moves them)."""
        if len(self.ema.shadow_params) != len(self._views):
            raise ValueError(
                f"the EMA holds {len(self.ema.shadow_params)} tensors; the model has {len(self._views)} parameters"
            )
        if all(s is v for s, v in zip(self.ema.shadow_params, self._views)):
            return
        with torch.no_grad():
            for view, tensor in zip(self._views, self.ema.shadow_params):
                view.copy_(tensor)
        self.ema.shadow_params = list(self._views)

    @torch.no_grad()
    def step(self) -> None:
        """One EMA update after an optimizer step (the counters and decay as `EMAModel.step` keeps them)."""
        self.rebind()
        ema = self.ema
        ema.optimization_step += 1
        decay = ema.get_decay(ema.optimization_step)
        ema.cur_decay_value = decay
        self.shadow.lerp_(self.flat.data, 1 - decay)
