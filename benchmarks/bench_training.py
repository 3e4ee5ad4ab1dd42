"""Training throughput: hf_ddpm's trainer against the loop of diffusers' `train_unconditional.py`, side by side.

* hf_ddpm: `hf_ddpm.training.train` itself (DDPMUNet `tiny-16`, DDPMPosteriorScheduler, `losses.py`, AdamW with
  gradient clipping, EMA, accelerate); its images/s excludes startup, saving and sampling.
* diffusers: the training loop of examples/unconditional_image_generation/train_unconditional.py, reproduced
  step for step in diffusers_recipe.py, timed over the same number of steps.

Same data (the built-in digits through `hf_ddpm.data`, 16x16, batch 16), same architecture (`UNet2DModel` built
by `DDPMUNet.to_diffusers_unet`, so the parameter counts are equal), one process, the same thread count.
Runs alternate, ours then diffusers', `--repeats` times. This shared machine's speed drifts by 10-20% over minutes
(diffusers' unchanged loop has measured 215-253 images/s), so besides the best of each the script prints the ratio
of each adjacent pair, which drift hits alike, and their median. The default 600 steps are 5.3 epochs of the
digits: a long run's steady state, where the first epoch (which fills hf_ddpm's image cache, `--cache_images_mb`)
no longer dominates; `--steps 200` shows a short run. Before the pairs, each loop runs `--warmup_steps` unmeasured
steps, so that one-time costs of the process (likely oneDNN building its kernels for these shapes, which the second
loop to run would otherwise find ready; lazy imports; the allocator growing) fall on neither: without it the first
pair was the lowest of every run.

    python benchmarks/bench_training.py [--steps 600] [--repeats 3] [--warmup_steps 50] [--threads N] [--hf_ddpm_flags '...'] [--quick]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import tempfile

import torch
from diffusers_recipe import train_unconditional_recipe

from hf_ddpm import DDPMUNet
from hf_ddpm.data import digits_dataset, prepare_dataset
from hf_ddpm.training import parse_args, train

RESOLUTION, BATCH = 16, 16


def run_hf_ddpm(steps: int, extra_flags: list[str]) -> float:
    """images/s of hf_ddpm's trainer with the digits preset at batch 16 (EMA on, grad clipping on)."""
    with tempfile.TemporaryDirectory() as out:
        flags = [
            "--preset", "digits", "--unet_preset", "tiny-16", "--output_dir", out, "--train_batch_size", str(BATCH),
            "--resolution", str(RESOLUTION), "--max_train_steps", str(steps), "--logger", "none",
            "--checkpointing_steps", "0", "--save_images_steps", "0", "--eval_steps", "0", "--sample_steps", "1",
            *extra_flags,
        ]  # fmt: skip
        return train(parse_args(flags)).metrics.images_per_second


def run_diffusers_loop(steps: int) -> float:
    """images/s of train_unconditional.py's loop (its defaults where they do not change the work done)."""
    unet = DDPMUNet.from_preset("tiny-16", in_channels=1, out_channels=1, sample_size=RESOLUTION)
    dataset = prepare_dataset(digits_dataset(), None, RESOLUTION, center_crop=True, random_flip=False, channels=1)
    run = train_unconditional_recipe(
        unet.to_diffusers_unet(), dataset, BATCH, max_steps=steps, lr_warmup_steps=100, lr_training_steps=steps
    )
    return run.images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default: 600)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating pairs of runs (default: 3)")
    parser.add_argument(
        "--warmup_steps", type=int, default=50, help="unmeasured steps of each loop first (default: 50)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="20 steps, one repeat: checks that it runs")
    parser.add_argument("--hf_ddpm_flags", default="", help="more train.py flags for hf_ddpm's runs, e.g. '--cache_images_mb 0'")  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repeats, args.warmup_steps = 20, 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    params = sum(p.numel() for p in DDPMUNet.from_preset("tiny-16", in_channels=1, out_channels=1).parameters())
    if args.warmup_steps:
        run_hf_ddpm(args.warmup_steps, shlex.split(args.hf_ddpm_flags))
        run_diffusers_loop(args.warmup_steps)
    ours, theirs = [], []
    for _ in range(args.repeats):
        ours.append(run_hf_ddpm(args.steps, shlex.split(args.hf_ddpm_flags)))
        theirs.append(run_diffusers_loop(args.steps))
    pair_ratios = [a / b for a, b in zip(ours, theirs)]
    result = {
        "hf_ddpm_images_per_s": max(ours),
        "diffusers_images_per_s": max(theirs),
        "ratio": max(ours) / max(theirs),
        "pair_ratios": pair_ratios,
        "median_pair_ratio": statistics.median(pair_ratios),
        "hf_ddpm_runs": ours,
        "diffusers_runs": theirs,
    }
    pairs = ", ".join(f"{a:.1f}/{b:.1f}={a / b:.2f}" for a, b in zip(ours, theirs))
    print(
        f"\ntraining throughput: digits {RESOLUTION}x{RESOLUTION}, batch {BATCH}, {args.steps} steps, 1 process, "
        f"hf_ddpm flags {args.hf_ddpm_flags or '(none)'}, "
        f"{torch.get_num_threads()} threads, {args.warmup_steps} warmup steps each, {args.repeats} alternating pairs; "
        f"U-Nets of {params:,} parameters\n"
        f"  hf_ddpm trainer (DDPMUNet tiny-16), best            {result['hf_ddpm_images_per_s']:8.1f} images/s\n"
        f"  diffusers train_unconditional loop (UNet2DModel), best {result['diffusers_images_per_s']:6.1f} images/s\n"
        f"  ratio of the bests                                  {result['ratio']:8.2f}\n"
        f"  pairs (hf_ddpm/diffusers images/s): {pairs}\n"
        f"  median ratio of the pairs                           {result['median_pair_ratio']:8.2f}\n"
        f"{json.dumps(result)}"
    )


if __name__ == "__main__":
    main()
