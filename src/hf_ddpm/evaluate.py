"""`python -m hf_ddpm.evaluate`: bits/dim and FID of a pipeline, printed as one JSON line.

    python -m hf_ddpm.evaluate --model outputs/digits-ddpm --metrics bpd,fid --num_samples 500 --scheduler ddim --steps 50

The measuring is `hf_ddpm.evaluator.Evaluator`'s, which training's `--eval_steps` runs too.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from .evaluator import BPD_MODES, SCHEDULERS, EvalConfig, add_dataset_arguments, evaluate_pipeline, real_images


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m hf_ddpm.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a pipeline folder or Hub repo id")
    add_dataset_arguments(parser)
    parser.add_argument("--metrics", default="bpd,fid", help="comma-separated: bpd, fid (default: bpd,fid)")
    parser.add_argument("--num_samples", type=int, default=256, help="real images for bpd and FID (default: 256)")
    parser.add_argument("--scheduler", default="ddim", choices=sorted(SCHEDULERS), help="sampler (default: ddim)")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (default: 50)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0)")
    parser.add_argument("--features", default=None, help="digits | inception | dinov2[:ID] (default: digits for the "
                        "built-in digits, else inception)")  # fmt: skip
    parser.add_argument("--bpd_mode", default="fast", choices=BPD_MODES, help="(default: fast)")
    parser.add_argument("--seed", type=int, default=0, help="(default: 0)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the CLI; prints one JSON line and returns it as a dict."""
    args = parse_args(argv)
    from diffusers import DiffusionPipeline

    import hf_ddpm  # noqa: F401 - registers our classes with diffusers

    pipe = DiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    size = pipe.unet.config.sample_size
    real = real_images(
        args.dataset, size, pipe.unet.config.in_channels, args.num_samples, args.image_column, args.split
    )
    features = args.features or ("digits" if args.dataset is None else "inception")
    config = EvalConfig(
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()],
        num_samples=len(real),
        scheduler=args.scheduler,
        steps=args.steps,
        eta=args.eta,
        features=features,
        dataset_key=f"{args.dataset or 'digits'}:{args.split}@{size}",
        bpd_mode=args.bpd_mode,
        seed=args.seed,
    )
    result = evaluate_pipeline(pipe, real, config)
    result = {"model": str(args.model), **result}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
