"""`make demo`: train the `digits` preset on the built-in digits (CPU, a few minutes), then sample an 8x8 grid.

    python -m hf_ddpm.demo [--output_dir DIR] [any train.py flag, e.g. --max_train_steps 500]

Writes an HFDDPMPipeline folder (EMA weights, model card, training grids) to `outputs/digits-ddpm/` and a DDIM
grid of 64 samples to `outputs/digits-ddpm/samples/demo-grid.png`; bits/dim and digits-FID are measured at steps
0, 800, 1600 and 2400 (`--eval_steps`) and shown in the card and the summary, and the saved scheduler config holds
the analytic-variance calibration (`--calibrate_variance 8`). The pipeline is loaded back the way users load it
(`import hf_ddpm` + `DiffusionPipeline.from_pretrained`) before sampling.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path

import torch

DEFAULT_OUTPUT_DIR = "outputs/digits-ddpm"


def _pick_threads() -> int:
    """Intra-op threads for this run. The demo's U-Net is small, so a step is thousands of short parallel regions;
    when other processes already keep the cores busy, every region waits for a descheduled OpenMP thread and two
    threads run slower than one. Use the cores that are idle (the 1-minute load average), at least one;
    an explicit OMP_NUM_THREADS is respected."""
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "getloadavg"):
        return torch.get_num_threads()
    idle = (os.cpu_count() or 1) - os.getloadavg()[0]
    return max(1, min(torch.get_num_threads(), int(idle + 0.5)))


def main(argv: Sequence[str] | None = None) -> Path:
    """Train, reload, sample; returns the path of the sample grid."""
    parser = argparse.ArgumentParser(prog="python -m hf_ddpm.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default=DEFAULT_OUTPUT_DIR, help=f"(default: {DEFAULT_OUTPUT_DIR})")
    parser.add_argument("--num_images", type=int, default=64, help="Samples in the grid. (default: 64)")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps. (default: 50)")
    demo_args, train_argv = parser.parse_known_args(argv)

    from diffusers import DiffusionPipeline

    import hf_ddpm  # noqa: F401 - registers HFDDPMPipeline with diffusers, as a user's script would

    from .training import main as train_main
    from .training.samples import save_grid

    threads = _pick_threads()
    torch.set_num_threads(threads)
    print(f"hf_ddpm demo: training the digits preset with {threads} CPU thread(s) (OMP_NUM_THREADS overrides)")
    start = time.perf_counter()
    # Resuming makes a second `make demo` reuse the finished run (or extend it, e.g. with more steps) instead of
    # retraining; delete the output folder to start over.
    resume = [] if "--resume_from_checkpoint" in train_argv else ["--resume_from_checkpoint", "latest"]
    # Bits/dim and digits-FID at steps 0, 800, 1600, 2400 on a small budget (a small share of the run; the flags below
    # override it, --eval_steps 0 turns it off).
    evaluation = ["--eval_steps", "800"]
    # Γ_t for the analytic variance (Bao et al. 2022) from 8 images at every t, stored in the saved scheduler config.
    calibration = ["--calibrate_variance", "8"]
    result = train_main(
        ["--preset", "digits", "--output_dir", demo_args.output_dir, *evaluation, *calibration, *resume, *train_argv]
    )
    train_seconds = time.perf_counter() - start

    pipe = DiffusionPipeline.from_pretrained(result.output_dir)
    pipe.scheduler = hf_ddpm.DDIMPosteriorScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=demo_args.num_images,
        num_inference_steps=demo_args.num_inference_steps,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    ).images
    grid = result.output_dir / "samples" / "demo-grid.png"
    save_grid(images, grid)

    m = result.metrics
    loss = "n/a" if m.final_loss is None else f"{m.final_loss:.4f}"
    evals = [e for e in m.eval_history if "eval/bpd" in e]
    evaluated = "off (--eval_steps 0)"
    if evals:
        first, last = evals[0], evals[-1]
        evaluated = (
            f"bits/dim {last['eval/bpd']:.3f} at step {last['step']} ({first['eval/bpd']:.3f} at step {first['step']})"
        )
        if "eval/fid" in last:
            evaluated += f", digits-FID {last['eval/fid']:.1f} ({first['eval/fid']:.1f})"
        seconds = sum(e.get("eval/seconds", 0.0) for e in m.eval_history)
        evaluated += f"; {seconds:.0f} s over {len(m.eval_history)} evaluations"
    print(
        f"\nhf_ddpm digits demo\n"
        f"  trained:   {m.global_step} steps, {m.train_seconds:.0f} s of training at {m.images_per_second:.0f} "
        f"images/s, final loss {loss}\n"
        f"  this run:  {train_seconds:.0f} s (startup, training or resuming, saving)\n"
        f"  evaluated: {evaluated}\n"
        f"  pipeline:  {result.output_dir}/ (model_index.json, unet/, scheduler/; EMA weights; the scheduler config "
        f"holds the analytic-variance calibration)\n"
        f"  card:      {result.output_dir / 'README.md'}\n"
        f"  samples:   {grid} ({demo_args.num_images} DDIM samples, {demo_args.num_inference_steps} steps)\n"
        f"  training grids and logs: {result.output_dir / 'samples'}/, {result.output_dir / 'logs'}/ "
        f"(tensorboard --logdir {result.output_dir / 'logs'})\n"
        f"  load it:   import hf_ddpm; from diffusers import DiffusionPipeline; "
        f'DiffusionPipeline.from_pretrained("{result.output_dir}")'
    )
    return grid


if __name__ == "__main__":
    main()
