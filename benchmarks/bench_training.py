"""Training throughput: hf_ddpm's trainer against the loop of diffusers' `train_unconditional.py`, side by side.

* hf_ddpm: `hf_ddpm.training.train` itself (DDPMUNet `tiny-16`, DDPMPosteriorScheduler, `losses.py`, AdamW with
  gradient clipping, EMA, accelerate); its images/s excludes startup, saving and sampling.
* diffusers: the training loop of examples/unconditional_image_generation/train_unconditional.py, reproduced
  step for step (accelerate, `UNet2DModel`, `DDPMScheduler.add_noise`, MSE on ε, clipping at 1.0, AdamW,
  `get_scheduler`, `EMAModel` with warmup, per-step loss logging), timed over the same number of steps.

Same data (the built-in digits through `hf_ddpm.data`, 16x16, batch 16), same architecture (`UNet2DModel` built
by `DDPMUNet.to_diffusers_unet`, so the parameter counts are equal), one process, the same thread count.
Runs alternate and the best of `--repeats` is reported, which damps the noise of a shared machine.

    python benchmarks/bench_training.py [--steps 200] [--repeats 2] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader

from hf_ddpm import DDPMUNet
from hf_ddpm.data import collate_fn, digits_dataset, prepare_dataset
from hf_ddpm.training import parse_args, train

RESOLUTION, BATCH = 16, 16


def run_hf_ddpm(steps: int) -> float:
    """images/s of hf_ddpm's trainer with the digits preset at batch 16 (EMA on, grad clipping on)."""
    with tempfile.TemporaryDirectory() as out:
        flags = [
            "--preset", "digits", "--unet_preset", "tiny-16", "--output_dir", out, "--train_batch_size", str(BATCH),
            "--resolution", str(RESOLUTION), "--max_train_steps", str(steps), "--logger", "none",
            "--checkpointing_steps", "0", "--save_images_steps", "0", "--eval_steps", "0", "--sample_steps", "1",
        ]  # fmt: skip
        return train(parse_args(flags)).metrics.images_per_second


def run_diffusers_loop(steps: int) -> float:
    """images/s of train_unconditional.py's loop (its defaults where they do not change the work done)."""
    accelerator = Accelerator(gradient_accumulation_steps=1, mixed_precision="no")
    unet = DDPMUNet.from_preset("tiny-16", in_channels=1, out_channels=1, sample_size=RESOLUTION)
    model = unet.to_diffusers_unet()
    noise_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    dataset = prepare_dataset(digits_dataset(), None, RESOLUTION, center_crop=True, random_flip=False, channels=1)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, collate_fn=collate_fn)
    lr_scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=100, num_training_steps=steps)
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    ema_model = EMAModel(
        model.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=3 / 4,
        model_cls=type(model), model_config=model.config,
    )  # fmt: skip
    ema_model.to(accelerator.device)
    global_step, images, start = 0, 0, time.perf_counter()
    while global_step < steps:
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
            if global_step >= steps:
                break
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per run (default: 200)")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each, best kept (default: 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="20 steps, one repeat: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats = 20, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    params = sum(p.numel() for p in DDPMUNet.from_preset("tiny-16", in_channels=1, out_channels=1).parameters())
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(run_hf_ddpm(args.steps))
        theirs.append(run_diffusers_loop(args.steps))
    result = {
        "hf_ddpm_images_per_s": max(ours),
        "diffusers_images_per_s": max(theirs),
        "ratio": max(ours) / max(theirs),
    }
    print(
        f"\ntraining throughput: digits {RESOLUTION}x{RESOLUTION}, batch {BATCH}, {args.steps} steps, 1 process, "
        f"{torch.get_num_threads()} threads, best of {args.repeats}; U-Nets of {params:,} parameters\n"
        f"  hf_ddpm trainer (DDPMUNet tiny-16)            {result['hf_ddpm_images_per_s']:8.1f} images/s\n"
        f"  diffusers train_unconditional loop (UNet2DModel) {result['diffusers_images_per_s']:5.1f} images/s\n"
        f"  ratio hf_ddpm / diffusers                     {result['ratio']:8.2f}\n"
        f"{json.dumps(result)}"
    )


if __name__ == "__main__":
    main()
