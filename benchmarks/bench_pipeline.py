"""End to end: HFDDPMPipeline vs diffusers' DDIMPipeline, DDIM 50 steps, equal weights, printed side by side.

    .venv/bin/python benchmarks/bench_pipeline.py              # small-32 preset, batch 16, 50 steps (~2 min)
    .venv/bin/python benchmarks/bench_pipeline.py --quick      # tiny-16, batch 4, 10 steps: checks that it runs

Both pipelines get the same weights (a random `UNet2DModel` of the preset's config, converted to `DDPMUNet` with
`DDPMUNet.from_diffusers_unet`, as in bench_unet.py), the same DDIM config (linear β, T = 1000, η = 0, diffusers'
default spacing) and the same generator seed; the printed max |difference| of their images checks that they compute
the same thing. x̂_0 clipping is off for both: on random weights the predicted x̂_0 lies far outside [-1, 1], and
clipping it makes 50 DDIM steps chaotic, so the U-Nets' ~1e-6 float differences grew to image differences of ~0.9
(with clipping on, diffusers' own pipeline with our converted U-Net diverged from itself the same way); without it
the images agree to ~1e-5. Clipping is one clamp per step, no measurable cost.
Runs alternate (ABAB...) and the median of `--repeats` is reported.

"Outside the U-Net" is the pipeline's own time (noise, scheduler steps, progress bar, post-processing): the total
minus the time spent inside the U-Net's forward calls, measured with forward pre/post hooks around each call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np
import torch
from bench_unet import build  # same weights for both, via the conversion
from diffusers import DDIMPipeline, DDIMScheduler

from hf_ddpm import DDIMPosteriorScheduler, HFDDPMPipeline
from hf_ddpm.models.unet import UNET_PRESETS

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False
)


class UNetClock:
    """Seconds spent inside a module's forward calls (hooks on the module itself, so nothing else is counted)."""

    def __init__(self, module: torch.nn.Module):
        self.seconds, self._start = 0.0, 0.0
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._leave)

    def _enter(self, *_) -> None:
        self._start = time.perf_counter()

    def _leave(self, *_) -> None:
        self.seconds += time.perf_counter() - self._start


def build_pipelines(preset: str) -> dict[str, tuple]:
    """{name: (pipeline, UNetClock)} for ours and diffusers' with equal weights and DDIM configs."""
    ours_unet, their_unet = build("ours", preset).eval(), build("diffusers", preset).eval()
    pipes = {
        "hf_ddpm": HFDDPMPipeline(unet=ours_unet, scheduler=DDIMPosteriorScheduler(**SCHEDULER_CONFIG)),
        "diffusers": DDIMPipeline(unet=their_unet, scheduler=DDIMScheduler(**SCHEDULER_CONFIG)),
    }
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    return {name: (pipe, UNetClock(pipe.unet)) for name, pipe in pipes.items()}


def sample(pipe, batch: int, steps: int, seed: int) -> np.ndarray:
    """[N, H, W, C] in [0, 1]; DDIMPipeline's call takes eta and output_type="np" like ours."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(batch_size=batch, num_inference_steps=steps, eta=0.0, generator=generator, output_type="np").images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny-16, batch 4, 10 steps: checks that it runs")
    parser.add_argument("--preset", default=None, help="U-Net preset (default: small-32; tiny-16 with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="images per call (default: 16; 4 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default: 50; 10 with --quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each, median reported (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    preset = args.preset or ("tiny-16" if args.quick else "small-32")
    batch = args.batch or (4 if args.quick else 16)
    steps = args.steps or (10 if args.quick else 50)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = UNET_PRESETS[preset]["sample_size"]
    print(f"# bench_pipeline: DDIM {steps} steps, batch {batch}, {preset} ({size}x{size}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)  # fmt: skip

    pipes = build_pipelines(preset)
    with torch.inference_mode():
        images = {name: sample(pipe, batch, steps, seed=0) for name, (pipe, _) in pipes.items()}  # also the warmup
    diff = float(np.abs(images["hf_ddpm"] - images["diffusers"]).max())
    params = sum(p.numel() for p in pipes["hf_ddpm"][0].unet.parameters())
    print(f"# {params:,} parameters; max |ours - diffusers| over the images in [0, 1]: {diff:.2e}")

    totals: dict[str, list[float]] = {name: [] for name in pipes}
    outside: dict[str, list[float]] = {name: [] for name in pipes}
    for repeat in range(args.repeats):
        for name, (pipe, clock) in pipes.items():
            clock.seconds = 0.0
            start = time.perf_counter()
            with torch.inference_mode():
                sample(pipe, batch, steps, seed=repeat + 1)
            total = time.perf_counter() - start
            totals[name].append(total)
            outside[name].append((total - clock.seconds) / total)
    result = {}
    print(f"{'pipeline':<34} {'s / call':>9} {'images/s':>9} {'outside U-Net':>14}")
    for name, (pipe, _) in pipes.items():
        seconds, share = statistics.median(totals[name]), statistics.median(outside[name])
        result[name] = {"seconds": seconds, "images_per_s": batch / seconds, "outside_unet_share": share}
        label = f"{name} ({type(pipe).__name__})"
        print(f"{label:<34} {seconds:>9.3f} {batch / seconds:>9.2f} {100 * share:>13.2f}%")
    result["speedup"] = result["hf_ddpm"]["images_per_s"] / result["diffusers"]["images_per_s"]
    result["max_abs_image_diff"] = diff
    print(f"speedup hf_ddpm / diffusers: {result['speedup']:.2f}x (goal >= 1.15x; outside-U-Net goal < 2%)")
    print(f"# load average at the end {os.getloadavg()[0]:.2f} (on {os.cpu_count()} CPUs)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
