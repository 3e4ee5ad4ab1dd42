"""Training on one batch: ε and t drawn -> q(x_t|x_0) -> U-Net -> loss -> backward, inside accelerate's gradient
accumulation; the batch that closes a window also clips, steps AdamW and zeroes the gradients.

The noise and timesteps come from the global torch RNG (seeded per process and saved in checkpoints), so a resumed
run draws the same ones. A window with a NaN/inf loss on any process is not applied (`window_finite`).
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from accelerate import Accelerator

from ..losses import LossTerms, training_losses
from ..schedulers import DDPMPosteriorScheduler
from .flat_params import FlatParameters


class TrainStep:
    """The arithmetic of a training batch, for the trainer that owns the models (it passes them in, so that
    freeing its DDP wrapper frees it everywhere)."""

    def __init__(
        self,
        args: argparse.Namespace,
        accelerator: Accelerator,
        noise_scheduler: DDPMPosteriorScheduler,
        flat: FlatParameters,
        optimizer: Any,
        *,
        channels: int,
        channels_last: bool,
    ):
        self.args, self.accelerator, self.device = args, accelerator, accelerator.device
        self.noise_scheduler, self.diffusion = noise_scheduler, noise_scheduler.diffusion
        self.flat, self.optimizer = flat, optimizer
        self.channels, self.channels_last = channels, channels_last
        self.window_finite = True  # every loss of the current accumulation window, on every process, was finite

    def loss_terms(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, model: torch.nn.Module) -> LossTerms:
        """Loss terms of a batch x0 [N, C, H, W]; the network may run in fp16/bf16, the schedule and loss math stay
        float32."""
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        with self.accelerator.autocast():
            out = model(x_t, t).sample
        args = self.args
        return training_losses(
            self.diffusion, out.float(), x0, noise, x_t, t,
            args.prediction_type, args.variance_type, args.loss_type, args.snr_gamma,
        )  # fmt: skip

    def __call__(
        self, batch: dict[str, Any], model: torch.nn.Module, train_model: torch.nn.Module
    ) -> tuple[torch.Tensor, int]:
        """Forward (through `train_model`, maybe compiled) and backward of one batch inside the accumulation of
        `model` (the prepared one); returns (the process-mean loss, images trained on over all processes)."""
        x0 = batch["pixel_values"].to(self.device, torch.float32)
        real = x0.shape[0] > 0
        if not real:  # every image unreadable: a zero-weight batch keeps all processes' collectives in step
            size = self.args.resolution
            x0 = torch.zeros(1, self.channels, size, size, device=self.device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=self.device)
        if self.channels_last:  # drawn in NCHW above (randn_like follows its input's layout), so the same noise
            x0, noise = (x.contiguous(memory_format=torch.channels_last) for x in (x0, noise))
        with self.accelerator.accumulate(model):
            loss = self.loss_terms(x0, noise, t, train_model).loss.mean() * float(real)
            mean_loss = self.accelerator.reduce(loss.detach(), reduction="mean")
            # Backward even on a NaN loss: DDP expects one after every forward; those gradients are dropped below.
            self.accelerator.backward(loss)
            # Read after queueing the backward: reading it before would leave a GPU idle while the host queues it.
            self.window_finite &= bool(torch.isfinite(mean_loss))
            if self.accelerator.sync_gradients:
                if self.window_finite:
                    if self.args.max_grad_norm > 0:
                        self.accelerator.clip_grad_norm_([self.flat.param], self.args.max_grad_norm)
                    self.optimizer.step()
                self.flat.zero_grad()
        return mean_loss, x0.shape[0] * real * self.accelerator.num_processes
