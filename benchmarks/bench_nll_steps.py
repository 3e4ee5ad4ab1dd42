"""Bits/dim against the number of steps K (Bao et al. 2022, Table 1): the K-step variational bound of a trained model
with the fixed reverse variance (β̃ of each respaced step) and with the analytic one from its calibration.

    python benchmarks/bench_nll_steps.py --model spaces/hf-ddpm/model --num_images 256 --threads 2

The model's scheduler config must hold `analytic_gamma` (`python -m hf_ddpm.calibrate`, or `train.py
--calibrate_variance`). Images are the built-in digits after the first `--skip` (those calibrated the model, by
default), unaugmented. The K steps are spread evenly over [0, T-1] with both ends (Bao et al.'s even trajectory: the
decoder L_0 acts at t = 0, the prior at t = T-1); both bounds of a K use the same noise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import hf_ddpm  # noqa: F401 - registers the pipeline with diffusers
from hf_ddpm import HFDDPMPipeline
from hf_ddpm.evaluation import respaced_bits_per_dim
from hf_ddpm.evaluator import real_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="spaces/hf-ddpm/model", help="a calibrated hf_ddpm pipeline folder")
    parser.add_argument("--num_images", type=int, default=256, help="images the bound is averaged over")
    parser.add_argument("--skip", type=int, default=8, help="leading digits left out (the calibration's)")
    parser.add_argument("--steps", default="10,25,50,100,200,1000", help="comma-separated K")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="8 images, K = 2 and 10: checks that it runs")
    args = parser.parse_args()
    if args.quick:
        args.num_images, args.steps = 8, "2,10"
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = HFDDPMPipeline.from_pretrained(args.model)
    config = pipe.scheduler.config
    if config.get("analytic_gamma") is None:
        parser.error(f"{args.model} has no analytic_gamma: run python -m hf_ddpm.calibrate --model {args.model}")
    unet, process = pipe.unet.eval(), pipe.scheduler.diffusion
    size, channels = unet.config.sample_size, unet.config.in_channels
    x0 = real_images(None, size, channels, args.skip + args.num_images)[args.skip :]
    data_half_range = config.clip_sample_range if config.clip_sample else None
    print(f"# bench_nll_steps: {args.model}, {len(x0)} digits, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")  # fmt: skip
    print("| K | fixed β̃ bits/dim | analytic bits/dim | seconds |\n|---|---|---|---|")
    rows = []
    with torch.no_grad():
        for k in (int(value) for value in args.steps.split(",")):
            if k < 2:
                parser.error(f"--steps: each K must be >= 2 (the decoder and the prior), got {k}")
            timesteps = sorted({round(i * (process.num_timesteps - 1) / (k - 1)) for i in range(k)})
            start = time.perf_counter()
            bounds = {
                name: respaced_bits_per_dim(
                    unet, process, x0, timesteps, config.prediction_type, config.variance_type,
                    analytic_gamma=gamma, data_half_range=data_half_range,
                    generator=torch.Generator().manual_seed(0),
                ).total.mean().item()
                for name, gamma in (("fixed", None), ("analytic", config.analytic_gamma))
            }  # fmt: skip
            seconds = time.perf_counter() - start
            rows.append({"K": k, **bounds, "seconds": round(seconds, 1)})
            print(f"| {k} | {bounds['fixed']:.3f} | {bounds['analytic']:.3f} | {seconds:.0f} |", flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
