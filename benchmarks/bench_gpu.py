"""Training and sampling speed of the paper's CIFAR-10 U-Net on one GPU: DDPMUNet against diffusers' UNet2DModel.

    bash benchmarks/gpu.sh             # a CUDA GPU: the ddpm-cifar10 preset (35.7M), budgeted for 8 min on an H100
    bash benchmarks/gpu.sh --smoke     # any machine, a tiny U-Net, seconds (tests/test_speed_flags.py runs it)

Both models hold the same weights (`DDPMUNet.to_diffusers_unet()`) and do the same work:

* train: one optimizer step of the paper's recipe at batch 128 on a synthetic batch already on the device (no data
  loading): t ~ U{0..999}, ε ~ N(0, I), x_t from our scheduler's `add_noise`, the U-Net (dropout 0.1), L_simple
  from `hf_ddpm.losses`, backward, gradient clipping at 1, fused AdamW (lr 2e-4), EMA 0.9999 (diffusers' EMAModel,
  foreach), then reading the loss (one host sync per step, as train.py's logging does). steps/s over at least
  `--seconds` of steps after `--warmup` steps; the warmup (which holds the compilation) is reported apart.
* sample: 256 images with 1000 DDPM steps and with 50 DDIM steps (η = 0): ours through HFDDPMPipeline with
  DDPMPosteriorScheduler / DDIMPosteriorScheduler, diffusers' through DDPMPipeline / DDIMPipeline with
  DDPMScheduler / DDIMScheduler (the same default config), output_type "np"; a call of 2 steps at the same batch
  size warms up first (and compiles, in the compiled rows).

Rows: fp32 (PyTorch's TF32 defaults unless --tf32, printed in the header); bf16 = torch.autocast(bfloat16) around
the U-Net with float32 weights, optimizer and scheduler math; "+ channels_last" = model and batch in NHWC; "+
compile" = torch.compile (inductor, default mode; the training forward as `train.py --dynamo_backend inductor`
does, the sampling U-Net in place as `HFDDPMPipeline.compile_unet()` does). Inductor's own layout optimisation
makes compiled convolutions channels_last anyway.

Anchors (Ho et al. 2020): 21 training steps/s at batch 128 on a TPU v3-8; 256 images sampled in 17 s.
Goals on one H100: >= 50 steps/s and <= 10 s for the 256 images (1000 DDPM steps).

Each row is timed between torch.cuda.synchronize() calls. A row that fails prints its error and the run goes on;
a row that would end after `--budget` seconds is skipped. Prints a table, then one JSON line; writes no files
(inductor's and triton's caches go to the temporary folder: gpu.sh points them there).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel

from hf_ddpm import DDIMPosteriorScheduler, DDPMPosteriorScheduler, DDPMUNet, HFDDPMPipeline
from hf_ddpm.compilation import compile_kwargs, compile_problem
from hf_ddpm.losses import training_losses
from hf_ddpm.models.unet import UNET_PRESETS

ANCHORS = {"paper_train_steps_per_s_tpu_v3_8": 21.0, "paper_sample_256_seconds": 17.0}
GOALS = {"train_steps_per_s": 50.0, "sample_256_ddpm1000_seconds": 10.0}
IMPLS = ("ours", "diffusers")

# The smoke run's U-Net: 8x8, two levels, attention at 4x4 (convertible to UNet2DModel).
SMOKE_UNET = dict(
    sample_size=8,
    base_channels=16,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_groups=8,
    dropout=0.1,
)


def print_row(label: str, cells: dict, warms: dict, higher_is_better: bool) -> None:
    """One table row: ours, diffusers, the speedup of ours (rates: ours / theirs; times: theirs / ours), warmups."""
    ours, theirs = cells["ours"], cells["diffusers"]
    ratio = (ours / theirs if higher_is_better else theirs / ours) if ours and theirs else None
    print(f"{label:<34} {fmt(ours, '8.2f')} {fmt(theirs, '10.2f')} "
          f"{fmt(ratio, '6.2f')}{'x' if ratio else ' '}   {fmt(warms['ours'], '.1f')} / {fmt(warms['diffusers'], '.1f')}",
          flush=True)  # fmt: skip


# (label, autocast bf16, channels_last, compile, estimated seconds of the pair on an H100 for the budget)
TRAIN_ROWS = [
    ("fp32", False, False, False, 25),
    ("bf16", True, False, False, 20),
    ("bf16 + channels_last", True, True, False, 20),
    ("bf16 + compile", True, False, True, 200),
]
# (label, scheduler kind, bf16, compile, estimated seconds): the compiled DDIM row reuses the compiled DDPM U-Net.
SAMPLE_ROWS = [
    ("DDIM {steps} fp32", "ddim", False, False, 15),
    ("DDIM {steps} bf16", "ddim", True, False, 10),
    ("DDPM {steps} bf16", "ddpm", True, False, 40),
    ("DDPM {steps} bf16 + compile", "ddpm", True, True, 100),
    ("DDIM {steps} bf16 + compile", "ddim", True, True, 10),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Models:
    """Fresh copies of one set of weights, as DDPMUNet and as the equivalent UNet2DModel."""

    def __init__(self, config: dict[str, Any], device: torch.device):
        torch.manual_seed(0)
        ours = DDPMUNet(**config)
        # The paper zero-initialises the output conv (and every block's last layer): give them weights so that the
        # sampled images and the loss are not constant (the speed does not depend on it).
        with torch.no_grad():
            for p in ours.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0, 0.02)
        theirs = ours.to_diffusers_unet()
        self.device = device
        self.states = {"ours": ours.state_dict(), "diffusers": theirs.state_dict()}
        self.configs = {"ours": dict(ours.config), "diffusers": dict(theirs.config)}
        self.num_parameters = sum(p.numel() for p in ours.parameters())
        x = torch.randn(2, config.get("in_channels", 3), config["sample_size"], config["sample_size"])
        with torch.no_grad():
            self.max_abs_diff = float((ours.eval()(x, 10).sample - theirs.eval()(x, 10).sample).abs().max())

    def build(self, impl: str, channels_last: bool) -> torch.nn.Module:
        cls = DDPMUNet if impl == "ours" else UNet2DModel
        model = cls.from_config(self.configs[impl])
        model.load_state_dict(self.states[impl])
        if impl == "ours":
            model.channels_last = channels_last  # else it picks by device
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        return model.to(self.device).to(memory_format=fmt)


def make_train_step(
    model: torch.nn.Module, batch: int, bf16: bool, channels_last: bool, compiled: dict[str, Any] | None
) -> Callable[[], float]:
    """One optimizer step of the paper's recipe (see the module docs); returns the loss (a host sync)."""
    device = next(model.parameters()).device
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, fused=True)
    ema = EMAModel(params, decay=0.9999, use_ema_warmup=True, power=0.75, foreach=True)
    scheduler = DDPMPosteriorScheduler()
    diffusion = scheduler.diffusion
    size, channels = model.config.sample_size, model.config.in_channels
    x0 = torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    if channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    forward = torch.compile(model, **compiled) if compiled is not None else model

    def step() -> float:
        noise = torch.randn_like(x0)
        t = torch.randint(0, diffusion.num_timesteps, (batch,), device=device)
        x_t = scheduler.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = forward(x_t, t).sample
        loss = training_losses(diffusion, out.float(), x0, noise, x_t, t).loss.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(params)
        return float(loss.detach())

    return step


def time_train(step: Callable[[], float], device: torch.device, warmup: int, seconds: float, block: int):
    """(steps/s, warmup seconds): `warmup` steps, then blocks of `block` steps until `seconds` have passed."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.perf_counter() - start
    steps, start = 0, time.perf_counter()
    while True:
        for _ in range(block):
            step()
        steps += block
        sync(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return steps / elapsed, warm


def make_pipeline(impl: str, kind: str, unet: torch.nn.Module):
    if impl == "ours":
        scheduler = DDPMPosteriorScheduler() if kind == "ddpm" else DDIMPosteriorScheduler()
        pipe = HFDDPMPipeline(unet=unet, scheduler=scheduler)
    else:
        pipe = (DDPMPipeline if kind == "ddpm" else DDIMPipeline)(
            unet=unet, scheduler=DDPMScheduler() if kind == "ddpm" else DDIMScheduler()
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def time_sample(pipe, device: torch.device, images: int, steps: int, kind: str, bf16: bool) -> tuple[float, float]:
    """(seconds for `images` images in `steps` steps, warmup seconds of a 2-step call at the same batch size)."""
    extra = {"eta": 0.0} if kind == "ddim" else {}

    def call(n: int) -> None:
        generator = torch.Generator(device).manual_seed(0)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            pipe(batch_size=images, num_inference_steps=n, generator=generator, output_type="np", **extra)

    start = time.perf_counter()
    call(2)
    sync(device)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    call(steps)
    sync(device)
    return time.perf_counter() - start, warm


def short_error(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def fmt(value: float | None, spec: str) -> str:
    """`value` formatted by `spec`, or "-" right-aligned to the spec's width when there is no value."""
    if value is None:
        width = spec.split(".")[0]
        return format("-", f">{width}") if width else "-"
    return format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny U-Net and sizes, any device, seconds")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--train_batch", type=int, default=None, help="training batch (default: 128; smoke 4)")
    parser.add_argument("--images", type=int, default=None, help="images sampled per call (default: 256; smoke 4)")
    parser.add_argument("--ddpm_steps", type=int, default=None, help="DDPM sampling steps (default: 1000; smoke 10)")
    parser.add_argument("--ddim_steps", type=int, default=None, help="DDIM sampling steps (default: 50; smoke 3)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed training steps per row (default: 5; smoke 1)"
    )
    parser.add_argument("--seconds", type=float, default=None, help="timed training seconds per row (default: 4)")
    parser.add_argument("--budget", type=float, default=None, help="skip rows that would end later (default: 450 s)")
    parser.add_argument("--tf32", choices=("default", "on", "off"), default="default",
                        help="TF32 for convolutions and matmuls: PyTorch's defaults (cuDNN on, matmul off), or both")  # fmt: skip
    parser.add_argument("--cudnn_benchmark", action="store_true", help="torch.backends.cudnn.benchmark = True")
    parser.add_argument("--compile_backend", default=None,
                        help="TorchDynamo backend of the compiled rows (default: inductor; smoke: aot_eager, which "
                             "needs no compiler)")  # fmt: skip
    parser.add_argument("--compile_mode", default=None, help="inductor mode of the compiled rows (default: default)")
    args = parser.parse_args()
    # diffusers' resamplers call an lru_cache'd version check inside forward; dynamo warns about it at every compile.
    warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")

    smoke = args.smoke
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not smoke:
        print(
            "bench_gpu: no CUDA GPU here; the full run needs one (use --smoke for the tiny CPU run).", file=sys.stderr
        )
        raise SystemExit(2)
    batch = args.train_batch or (4 if smoke else 128)
    images = args.images or (4 if smoke else 256)
    ddpm_steps = args.ddpm_steps or (10 if smoke else 1000)
    ddim_steps = args.ddim_steps or (3 if smoke else 50)
    warmup = args.warmup if args.warmup is not None else (1 if smoke else 5)
    seconds = args.seconds if args.seconds is not None else (0.0 if smoke else 4.0)
    block = 2 if smoke else 10
    budget = args.budget if args.budget is not None else (600.0 if smoke else 450.0)
    backend = args.compile_backend or ("aot_eager" if smoke else "inductor")
    if args.tf32 != "default":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    compiled = compile_kwargs(backend, args.compile_mode)
    problem = compile_problem(backend, device)

    t0 = time.perf_counter()
    config = dict(SMOKE_UNET) if smoke else dict(UNET_PRESETS["ddpm-cifar10"])
    preset = "smoke (8x8 tiny)" if smoke else "ddpm-cifar10"
    models = Models(config, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    import diffusers

    tf32 = {
        "cudnn_conv": torch.backends.cudnn.allow_tf32,
        "matmul": torch.backends.cuda.matmul.allow_tf32,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    print(f"# bench_gpu: {name} ({device}), torch {torch.__version__}, diffusers {diffusers.__version__}, "
          f"{torch.get_num_threads()} CPU threads")  # fmt: skip
    print(f"# model: {preset}, {models.num_parameters:,} parameters; max |ours - diffusers| on equal weights "
          f"{models.max_abs_diff:.2e}")  # fmt: skip
    print(f"# TF32: cuDNN convolutions {tf32['cudnn_conv']}, matmuls {tf32['matmul']} (float32 matmul precision "
          f"{tf32['float32_matmul_precision']!r}); cudnn.benchmark {torch.backends.cudnn.benchmark}; compile: "
          f"{backend}, mode {args.compile_mode or 'default'}" + (f" (unavailable: {problem})" if problem else ""))  # fmt: skip

    errors: dict[str, str] = {}
    skipped: dict[str, str] = {}

    def attempt(key: str, estimate: float, needs_compile: bool, fn: Callable[[], Any]) -> Any:
        if needs_compile and problem:
            skipped[key] = problem
            return None
        if not smoke and time.perf_counter() - t0 + estimate > budget:
            skipped[key] = f"time budget ({budget:.0f} s) would be exceeded"
            return None
        try:
            return fn()
        except Exception as err:  # a failing row (compile error, out of memory) must not stop the others
            errors[key] = short_error(err)
            print(f"# {key} failed:\n{traceback.format_exc()}", file=sys.stderr)
            return None
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # --- training ------------------------------------------------------------------------------------------------
    train_results: dict[str, dict[str, float | None]] = {}
    train_warmup: dict[str, dict[str, float | None]] = {}
    print(f"\n{'training steps/s, batch ' + str(batch):<34} {'ours':>8} {'diffusers':>10} {'speedup':>7}   warmup s (ours / diffusers)")  # fmt: skip
    for label, bf16, channels_last, compile_row, estimate in TRAIN_ROWS:
        cells, warms = {}, {}
        for impl in IMPLS:

            def run(impl=impl, bf16=bf16, channels_last=channels_last, compile_row=compile_row):
                model = models.build(impl, channels_last)
                step = make_train_step(model, batch, bf16, channels_last, compiled if compile_row else None)
                return time_train(step, device, warmup, seconds, block)

            result = attempt(f"train/{label}/{impl}", estimate / 2, compile_row, run)
            cells[impl], warms[impl] = result if result is not None else (None, None)
        train_results[label], train_warmup[label] = cells, warms
        print_row(label, cells, warms, higher_is_better=True)

    torch._dynamo.reset()  # drops the compiled training graphs (and what they hold on the GPU)

    # --- sampling ------------------------------------------------------------------------------------------------
    sample_results: dict[str, dict[str, float | None]] = {}
    sample_warmup: dict[str, dict[str, float | None]] = {}
    unets: dict[tuple[str, bool], torch.nn.Module] = {}  # (impl, compiled) -> eval U-Net, reused across rows
    print(f"\n{'sampling ' + str(images) + ' images, seconds':<34} {'ours':>8} {'diffusers':>10} {'speedup':>7}   warmup s (ours / diffusers)")  # fmt: skip
    for label, kind, bf16, compile_row, estimate in SAMPLE_ROWS:
        steps = ddpm_steps if kind == "ddpm" else ddim_steps
        label = label.format(steps=steps)
        cells, warms = {}, {}
        for impl in IMPLS:

            def run(impl=impl, kind=kind, bf16=bf16, compile_row=compile_row, steps=steps):
                unet = unets.get((impl, compile_row))
                if unet is None:
                    unet = models.build(impl, channels_last=False).eval()
                    if compile_row:
                        if impl == "ours":
                            make_pipeline(impl, kind, unet).compile_unet(mode=args.compile_mode, backend=backend)
                        else:
                            unet.compile(**compiled)
                    unets[(impl, compile_row)] = unet
                return time_sample(make_pipeline(impl, kind, unet), device, images, steps, kind, bf16)

            result = attempt(f"sample/{label}/{impl}", estimate / 2, compile_row, run)
            cells[impl], warms[impl] = result if result is not None else (None, None)
        sample_results[label], sample_warmup[label] = cells, warms
        print_row(label, cells, warms, higher_is_better=False)

    # --- summary -------------------------------------------------------------------------------------------------
    best_train = max((v for row in train_results.values() for k, v in row.items() if k == "ours" and v), default=None)
    ddpm_rows = [row["ours"] for label, row in sample_results.items() if label.startswith("DDPM") and row["ours"]]
    best_sample = min(ddpm_rows, default=None)
    goals = {
        "train_steps_per_s": {"goal": GOALS["train_steps_per_s"], "best_ours": best_train,
                              "met": None if smoke or best_train is None else best_train >= GOALS["train_steps_per_s"]},
        "sample_256_ddpm1000_seconds": {"goal": GOALS["sample_256_ddpm1000_seconds"], "best_ours": best_sample,
                                        "met": None if smoke or best_sample is None
                                        else best_sample <= GOALS["sample_256_ddpm1000_seconds"]},
    }  # fmt: skip
    print(f"\n# anchors (paper, TPU v3-8): {ANCHORS['paper_train_steps_per_s_tpu_v3_8']:.0f} steps/s, 256 images in "
          f"{ANCHORS['paper_sample_256_seconds']:.0f} s. goals (one H100): >= {GOALS['train_steps_per_s']:.0f} steps/s "
          f"(best ours {fmt(best_train, '.1f')}), <= {GOALS['sample_256_ddpm1000_seconds']:.0f} s for 256 images with "
          f"1000 steps (best ours {fmt(best_sample, '.1f')})" + (" [smoke: sizes too small to judge]" if smoke else ""))  # fmt: skip
    for key, message in {**errors, **{k: f"skipped: {v}" for k, v in skipped.items()}}.items():
        print(f"# {key}: {message}")
    elapsed = time.perf_counter() - t0
    print(f"# total {elapsed:.0f} s")
    record = {
        "benchmark": "bench_gpu",
        "smoke": smoke,
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "model": preset,
        "parameters": models.num_parameters,
        "max_abs_diff": models.max_abs_diff,
        "tf32": tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "compile": {"backend": backend, "mode": args.compile_mode or "default", "unavailable": problem},
        "train_batch": batch,
        "train_steps_per_s": train_results,
        "train_warmup_s": train_warmup,
        "sample_images": images,
        "sample_steps": {"ddpm": ddpm_steps, "ddim": ddim_steps},
        "sample_seconds": sample_results,
        "sample_warmup_s": sample_warmup,
        "anchors": ANCHORS,
        "goals": goals,
        "errors": errors,
        "skipped": skipped,
        "elapsed_s": elapsed,
    }
    print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
