"""The training loop of diffusers' examples/unconditional_image_generation/train_unconditional.py, step for step.

Used by bench_training.py (throughput) and bench_quality.py (sample quality at equal CPU time) as the baseline:
accelerate, `UNet2DModel`, `DDPMScheduler.add_noise`, MSE on ε, clipping at 1.0, AdamW, `get_scheduler`, `EMAModel`
with warmup, per-step loss logging. The defaults are the script's (lr 1e-4, AdamW betas (0.95, 0.999), weight decay
1e-6, cosine schedule with 500 warmup steps, EMA max decay 0.9999 with power 3/4, linear β over T = 1000), except
where a caller sets them to measure like for like.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from hf_ddpm.data import collate_fn


@dataclass
class RecipeRun:
    """A finished run: the trained model, its EMA copy, the noise scheduler and the measured throughput."""

    model: UNet2DModel
    ema_model: UNet2DModel
    noise_scheduler: DDPMScheduler
    steps: int
    images_per_second: float
    cpu_seconds: float


def train_unconditional_recipe(
    model: UNet2DModel,
    dataset,
    batch_size: int = 16,
    max_steps: int | None = None,
    cpu_seconds: float | None = None,
    lr_warmup_steps: int = 500,
    lr_training_steps: int | None = None,
    seed: int = 0,
) -> RecipeRun:
    """Train `model` on a prepared `hf_ddpm.data` dataset until `max_steps` optimizer steps or `cpu_seconds` of this
    process's CPU time (`time.process_time`, so other jobs on the machine do not shorten the budget), whichever
    comes first. The cosine LR schedule spans `lr_training_steps` (the script's: 100 epochs of the data)."""
    if max_steps is None and cpu_seconds is None:
        raise ValueError("give max_steps or cpu_seconds")
    torch.manual_seed(seed)
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, collate_fn=collate_fn)
    lr_scheduler = get_scheduler(
        "cosine",
        optimizer=optimizer,
        num_warmup_steps=lr_warmup_steps,
        num_training_steps=lr_training_steps or 100 * len(loader),
    )
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema_model = EMAModel(
        model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
        model_cls=type(model), model_config=model.config,
    )  # fmt: skip
    ema_model.to(accelerator.device)
    global_step, images = 0, 0
    start, cpu_start = time.perf_counter(), time.process_time()

    def done() -> bool:
        if max_steps is not None and global_step >= max_steps:
            return True
        return cpu_seconds is not None and time.process_time() - cpu_start >= cpu_seconds

    while not done():
        for batch in loader:
            clean_images = batch["pixel_values"]
            noise = torch.randn(clean_images.shape, dtype=clean_images.dtype, device=clean_images.device)
            bsz = clean_images.shape[0]
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (bsz,), device=clean_images.device
            )
            noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
            with accelerator.accumulate(model):
                model_output = model(noisy_images, timesteps).sample
                loss = F.mse_loss(model_output.float(), noise.float())
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            if accelerator.sync_gradients:
                ema_model.step(model.parameters())
                global_step += 1
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
            logs["ema_decay"] = ema_model.cur_decay_value
            accelerator.log(logs, step=global_step)
            images += bsz
            if done():
                break
    seconds = time.perf_counter() - start
    model = accelerator.unwrap_model(model)
    ema_unet = UNet2DModel.from_config(model.config)
    ema_model.copy_to(ema_unet.parameters())
    return RecipeRun(model, ema_unet, noise_scheduler, global_step, images / seconds, time.process_time() - cpu_start)
