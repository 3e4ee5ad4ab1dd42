"""µs per scheduler call, ours next to diffusers', in one run on one machine.

    .venv/bin/python benchmarks/bench_schedulers.py [--repeats 7] [--device cpu] [--threads N]

Rows: a DDPM sampling loop over 1000 steps, DDIM over 50 steps at η = 0 and η = 1 (a (16, 3, 32, 32) float32 sample,
a fixed random model output, no network), and `add_noise` on a (128, 3, 32, 32) batch with random timesteps. Each
row is timed over whole loops (the sample carried from step to step, as a pipeline does, with a seeded generator
for the noise), after a warmup loop; the median of the repeats is reported per call. The goal is ours ≤ 0.7×
diffusers per step. A breakdown of the DDPM row follows: the noise draw alone (the same `randn_tensor` call with
the same generator in both, so the noise streams stay identical to diffusers'), and the step with that draw replaced
by a precomputed tensor.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import diffusers
import diffusers.schedulers.scheduling_ddpm as diffusers_ddpm
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

import hf_ddpm.schedulers.ddpm as hf_ddpm_ddpm
from hf_ddpm.schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler

SAMPLE_SHAPE = (16, 3, 32, 32)
BATCH_SHAPE = (128, 3, 32, 32)
ADD_NOISE_CALLS = 200


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_us_per_call(runs: list[Callable[[], int]], repeats: int, device: torch.device) -> list[float]:
    """Each `run` performs some calls and returns how many. One warmup run each, then `repeats` rounds that time every
    run once, alternating the order, so that ours and diffusers' see the same machine load; median µs per call."""
    for run in runs:
        run()
    sync(device)
    per_call: list[list[float]] = [[] for _ in runs]
    for r in range(repeats):
        order = list(range(len(runs)))
        if r % 2:
            order.reverse()
        for k in order:
            start = time.perf_counter()
            calls = runs[k]()
            sync(device)
            per_call[k].append((time.perf_counter() - start) / calls * 1e6)
    return [statistics.median(values) for values in per_call]


@contextlib.contextmanager
def precomputed_noise(device: torch.device):
    """Both DDPM steps draw z with diffusers' `randn_tensor`; return a fixed tensor instead, to time the rest."""
    z = torch.randn(SAMPLE_SHAPE, device=device)
    originals = (hf_ddpm_ddpm.randn_tensor, diffusers_ddpm.randn_tensor)
    hf_ddpm_ddpm.randn_tensor = diffusers_ddpm.randn_tensor = lambda *args, **kwargs: z
    try:
        yield
    finally:
        hf_ddpm_ddpm.randn_tensor, diffusers_ddpm.randn_tensor = originals


def noise_draw_loop(device: torch.device) -> Callable[[], int]:
    def run() -> int:
        generator = torch.Generator(device=device).manual_seed(1)
        for _ in range(50):
            randn_tensor(SAMPLE_SHAPE, generator=generator, device=device, dtype=torch.float32)
        return 50

    return run


def sampling_loop(scheduler, num_inference_steps: int, device: torch.device, **step_kwargs) -> Callable[[], int]:
    scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = list(scheduler.timesteps)  # 0-d tensors, as a pipeline iterates them
    g = torch.Generator(device=device).manual_seed(0)
    x_T = torch.randn(SAMPLE_SHAPE, generator=g, device=device)
    model_output = torch.randn(SAMPLE_SHAPE, generator=g, device=device)

    def run() -> int:
        generator = torch.Generator(device=device).manual_seed(1)
        sample = x_T
        for t in timesteps:
            sample = scheduler.step(model_output, t, sample, generator=generator, **step_kwargs).prev_sample
        return len(timesteps)

    return run


def add_noise_loop(scheduler, device: torch.device) -> Callable[[], int]:
    g = torch.Generator(device=device).manual_seed(0)
    x0 = torch.randn(BATCH_SHAPE, generator=g, device=device)
    noise = torch.randn(BATCH_SHAPE, generator=g, device=device)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (BATCH_SHAPE[0],), generator=g, device=device)

    def run() -> int:
        for _ in range(ADD_NOISE_CALLS):
            scheduler.add_noise(x0, noise, timesteps)
        return ADD_NOISE_CALLS

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads; default: torch's default")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"date      {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"cpu       {cpu_model()}")
    if device.type == "cuda":
        print(f"gpu       {torch.cuda.get_device_name(device)}")
    print(f"python    {platform.python_version()}, torch {torch.__version__}, diffusers {diffusers.__version__}")
    print(
        f"threads   {torch.get_num_threads()}{'' if args.threads else ' (torch default)'}, device {device}, repeats {args.repeats} (median)"
    )
    print(f"load      {' / '.join(f'{v:.2f}' for v in os.getloadavg())} (1/5/15 min) at start")
    print()

    ddpm = ("DDPM step, 1000 steps", lambda s: sampling_loop(s, 1000, device), DDPMPosteriorScheduler, DDPMScheduler)
    rows = [
        ddpm,
        (
            "DDIM step, 50 steps, eta=0",
            lambda s: sampling_loop(s, 50, device, eta=0.0),
            DDIMPosteriorScheduler,
            DDIMScheduler,
        ),
        (
            "DDIM step, 50 steps, eta=1",
            lambda s: sampling_loop(s, 50, device, eta=1.0),
            DDIMPosteriorScheduler,
            DDIMScheduler,
        ),
        ("add_noise (128,3,32,32)", lambda s: add_noise_loop(s, device), DDPMPosteriorScheduler, DDPMScheduler),
    ]
    header = f"{'case':<34} {'ours µs':>10} {'diffusers µs':>13} {'ours/diffusers':>15}"
    print(f"sample {SAMPLE_SHAPE} float32, model output random (no network)")
    print(header)
    print("-" * len(header))
    for name, make_loop, ours_cls, theirs_cls in rows:
        ours, theirs = median_us_per_call([make_loop(ours_cls()), make_loop(theirs_cls())], args.repeats, device)
        print(f"{name:<34} {ours:>10.1f} {theirs:>13.1f} {ours / theirs:>14.2f}x")
    print()
    print("breakdown of the DDPM row")
    (draw,) = median_us_per_call([noise_draw_loop(device)], args.repeats, device)
    print(f"{'  noise draw (randn_tensor), both':<34} {draw:>10.1f} {draw:>13.1f}")
    name, make_loop, ours_cls, theirs_cls = ddpm
    with precomputed_noise(device):
        ours, theirs = median_us_per_call([make_loop(ours_cls()), make_loop(theirs_cls())], args.repeats, device)
    print(f"{'  DDPM step, noise precomputed':<34} {ours:>10.1f} {theirs:>13.1f} {ours / theirs:>14.2f}x")


if __name__ == "__main__":
    main()
