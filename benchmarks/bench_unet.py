"""DDPMUNet vs diffusers' UNet2DModel on CPU, same config and weights (converted), printed side by side.

    .venv/bin/python benchmarks/bench_unet.py            # the paper's CIFAR-10 model (35.7M), a few minutes
    .venv/bin/python benchmarks/bench_unet.py --quick    # the tiny-16 preset, seconds
    .venv/bin/python benchmarks/bench_unet.py --preset tiny-16 --batch 16 --no-memory   # the digits trainer's U-Net

On a machine shared with other jobs, 2-thread OpenMP runs slow down erratically (a thread waits at every barrier for
its descheduled sibling); `--threads 1` then gives steadier ratios. The header prints the load average.

Times: float32 unless marked bf16 (`torch.autocast("cpu", dtype=torch.bfloat16)`), warmup runs, then the median of
`--repeats` runs; ours and diffusers' runs alternate (ABAB...) so that load from other processes hits both alike.
Training step = forward, MSE loss, backward, AdamW step (same optimizer settings for both).

Memory: each measurement runs once more in a fresh subprocess that builds only the model it measures, resets the
kernel's high-water mark (/proc/self/clear_refs) and runs the call twice. "peak" = the highest resident set size of
that process during those calls (VmHWM in /proc/self/status: Python, torch, model, activations, optimizer state);
"extra" = peak minus the resident size just before them, i.e. what the calls needed on top of weights and imports.
(`getrusage().ru_maxrss` is not used: after fork+exec it can carry the parent's peak.) RSS is memory the OS had to
provide, allocator caching included, not a count of live tensor bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch
from diffusers import UNet2DModel

from hf_ddpm.models.diffusers_conversion import GOOGLE_DDPM_CIFAR10_UNET2D
from hf_ddpm.models.unet import UNET_PRESETS, DDPMUNet

# UNet2DModel configs equivalent to our presets: google/ddpm-cifar10-32's, trained as in the paper (dropout 0.1).
DIFFUSERS_CONFIGS = {"ddpm-cifar10": {**GOOGLE_DDPM_CIFAR10_UNET2D, "dropout": 0.1}}


def diffusers_config(preset: str) -> dict:
    if preset in DIFFUSERS_CONFIGS:
        return DIFFUSERS_CONFIGS[preset]
    return DDPMUNet.from_preset(preset).to_diffusers_unet().config  # e.g. tiny-16


def build(impl: str, preset: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    theirs = UNet2DModel(**diffusers_config(preset))
    return theirs if impl == "diffusers" else DDPMUNet.from_diffusers_unet(theirs)


def make_step(model: torch.nn.Module, kind: str, batch: int, size: int):
    """A zero-argument callable running one measured call: `fwd` (no_grad, eval) or `train` (fwd+bwd+AdamW)."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    bf16 = kind.endswith("-bf16")
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)
    if kind.startswith("fwd"):
        model.eval()

        def step():
            with torch.no_grad(), autocast:
                model(x, t)

        return step
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    noise = torch.randn(x.shape, generator=gen)

    def step():
        with autocast:
            pred = model(x, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def proc_status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def child(impl: str, preset: str, kind: str, batch: int, size: int) -> None:
    """Peak memory of one measurement, in a process that holds only this model."""
    torch.manual_seed(0)
    model = UNet2DModel(**diffusers_config(preset)) if impl == "diffusers" else DDPMUNet.from_preset(preset)
    step = make_step(model, kind, batch, size)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS, so the peak below is the measured calls' own
    before = proc_status_mib("VmRSS")
    step()  # first call: includes one-time buffers (oneDNN primitives, AdamW state) as a real first step would
    step()
    peak = proc_status_mib("VmHWM")
    print(json.dumps({"peak": peak, "extra": peak - before}))


def memory(impl: str, preset: str, kind: str, batch: int, size: int) -> dict:
    cmd = [sys.executable, __file__, "--threads", str(torch.get_num_threads())]
    cmd += ["--_child", json.dumps([impl, preset, kind, batch, size])]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny-16 preset, small batches")
    parser.add_argument("--preset", choices=sorted(UNET_PRESETS), default=None, help="U-Net preset (default: ddpm-cifar10; tiny-16 with --quick)")  # fmt: skip
    parser.add_argument("--batch", type=int, default=None, help="the larger batch of the table (default: 16; 4 with --quick)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--no-memory", action="store_true", help="skip the per-measurement subprocesses")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._child:
        child(*json.loads(args._child))
        return

    preset = args.preset or ("tiny-16" if args.quick else "ddpm-cifar10")
    size = UNET_PRESETS[preset]["sample_size"]
    big = args.batch or (4 if args.quick else 16)
    repeats = args.repeats or (5 if args.quick else 7)
    print(f"# bench_unet: {preset} ({size}x{size}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.2f}")  # fmt: skip

    ours, theirs = build("ours", preset), build("diffusers", preset)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        diff = (ours.eval()(x, 10).sample - theirs.eval()(x, 10).sample).abs().max().item()
    params = sum(p.numel() for p in ours.parameters())
    print(f"# {params:,} parameters; max |ours - diffusers| on converted weights: {diff:.2e}")

    rows = [
        ("forward", "fwd", 1, ("ours", "diffusers")),
        ("forward", "fwd", big, ("ours", "diffusers")),
        ("forward bf16", "fwd-bf16", big, ("ours", "diffusers")),
        ("train step", "train", big, ("ours", "diffusers")),
        ("train step bf16", "train-bf16", big, ("ours", "diffusers")),
    ]
    header = f"{'measurement':<18} {'batch':>5} {'ours s':>9} {'diffusers s':>12} {'speedup':>8}"
    if not args.no_memory:
        header += f" {'ours peak/extra MiB':>21} {'diffusers peak/extra MiB':>25}"
    print(header)
    for name, kind, batch, impls in rows:
        # Fresh copies of the same weights per row, so one row's optimizer steps do not change the next row's.
        models = {"ours": build("ours", preset), "diffusers": build("diffusers", preset)}
        steps = {impl: make_step(models[impl], kind, batch, size) for impl in impls}
        times = {impl: [] for impl in impls}
        for impl in impls:
            for _ in range(args.warmup):
                steps[impl]()
        for _ in range(repeats):
            for impl in impls:
                t0 = time.perf_counter()
                steps[impl]()
                times[impl].append(time.perf_counter() - t0)
        med = {impl: statistics.median(ts) for impl, ts in times.items()}
        line = f"{name:<18} {batch:>5} {med['ours']:>9.3f} {med['diffusers']:>12.3f} {med['diffusers'] / med['ours']:>7.2f}x"
        if not args.no_memory:
            mem = {impl: memory(impl, preset, kind, batch, size) for impl in impls}
            cells = {impl: "{peak:.0f} / {extra:.0f}".format(**mem[impl]) for impl in impls}
            line += f" {cells['ours']:>21} {cells['diffusers']:>25}"
        print(line, flush=True)
    print(f"# load average at the end {os.getloadavg()[0]:.2f} (on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
