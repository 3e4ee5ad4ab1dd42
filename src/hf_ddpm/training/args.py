"""Command-line flags of `train.py`: diffusers' `train_unconditional.py` names, plus ours; recipes as presets.

A preset (`--preset`) is a U-Net, a noise schedule and an optimisation recipe. Flags that a preset sets default to
None here and take the preset's value unless given explicitly, so `--preset ddpm-cifar10 --learning_rate 1e-4`
is the paper's recipe with another learning rate. `--help` prints every flag's default (and each preset's value).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from diffusers.optimization import SchedulerType

from ..compilation import DYNAMO_BACKENDS, DYNAMO_MODES
from ..diffusion import LEARNED_VARIANCE_TYPES, PREDICTION_TYPES, VARIANCE_TYPES
from ..losses import LOSS_TYPES, check_loss_config
from ..models.unet import UNET_PRESETS
from ..schedulers.base import TIMESTEP_SPACINGS
from ..schedules import make_betas
from .periodic_eval import validate_eval_args

# The recipes. Keys are flag names (dest); every value here is a default that an explicit flag overrides.
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: the 1,797 built-in 8x8 digits upscaled to 16x16, in a few minutes on 2 cores. The U-Net is tiny-16
    # at half width with a 4x-wide bottom level (650k parameters; 2.2x the images/s of tiny-16 on CPU, where
    # convolutions over few channels are the cost). The cosine schedule (Nichol & Dhariwal 2021) keeps more signal
    # at small t than linear does at this resolution, and min-SNR-5 (Hang et al. 2023) speeds convergence: with
    # both, digits are legible after ~600 steps where the linear schedule still gives noise. No flips: digits are
    # not mirror-symmetric. 2400 steps (not 1200), trailing spacing and the step-proportional EMA below bring
    # few-step DDIM close to 1000 DDPM steps: digits-FID of DDIM-20 / DDIM-50 (η=0) is 1.10x / 0.95x DDPM-1000's
    # (docs/benchmarks.md, bench_quality, means of 3 sampling seeds).
    "digits": dict(
        unet_preset="tiny-16",
        unet_overrides={"base_channels": 16, "channel_mult": [1, 2, 4], "num_groups": 8},
        resolution=16,
        center_crop=True,
        random_flip=False,
        dropout=0.0,
        ddpm_num_steps=1000,
        ddpm_beta_schedule="squaredcos_cap_v2",
        snr_gamma=5.0,
        train_batch_size=64,
        max_train_steps=2400,
        learning_rate=2e-3,
        lr_scheduler="cosine",
        lr_warmup_steps=100,
        use_ema=True,
        # EMA decay s / (s + 2) at step s: the weights averaged with weight ∝ step, i.e. EDM2's power-function EMA
        # with exponent 1 (Karras et al. 2024), σ_rel 0.24. Post hoc, from raw snapshots of one run, it beat the
        # 0.75-power warmup (σ_rel ~0.14) at DDIM-50 and DDIM-20 on each of 3 sampling seeds (docs/benchmarks.md, bench_quality).
        ema_inv_gamma=2.0,
        ema_power=1.0,
        ema_max_decay=0.9999,
        checkpointing_steps=800,
        checkpoints_total_limit=2,
        save_images_steps=800,
        timestep_spacing="trailing",
    ),
    # Ho et al. 2020, Appendix B (CIFAR-10): 35.7M U-Net, lr 2e-4 with 5000 warmup steps then constant, batch 128,
    # dropout 0.1, random flips, EMA 0.9999, gradient clipping at 1, linear β 1e-4..0.02 over T = 1000, 800k steps.
    "ddpm-cifar10": dict(
        unet_preset="ddpm-cifar10",
        resolution=32,
        center_crop=True,
        random_flip=True,
        dropout=0.1,
        train_batch_size=128,
        max_train_steps=800_000,
        learning_rate=2e-4,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=5000,
        use_ema=True,
        ema_inv_gamma=1.0,
        ema_max_decay=0.9999,
        ema_power=0.75,
        ddpm_num_steps=1000,
        ddpm_beta_schedule="linear",
        snr_gamma=None,
        checkpointing_steps=5000,
        checkpoints_total_limit=3,
        save_images_steps=10_000,
        timestep_spacing="leading",
    ),
}
DEFAULT_PRESET = "digits"
LOGGERS = ("tensorboard", "wandb", "none")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
LR_SCHEDULERS = tuple(s.value for s in SchedulerType if s.value != "piecewise_constant")


def _preset_default_text(dest: str) -> str:
    values = "; ".join(f"{name}: {preset[dest]}" for name, preset in TRAINING_PRESETS.items() if dest in preset)
    return f"(default: from --preset — {values})"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `train.py`; every flag's help ends with its default."""
    parser = argparse.ArgumentParser(
        prog="train.py",
        description="Train a DDPM (Ho et al. 2020) with hf_ddpm; writes an HFDDPMPipeline folder + model card.",
    )
    group = parser

    def add(*flags: str, help: str, **kwargs: Any) -> None:
        dest = flags[0].lstrip("-")
        if any(dest in preset for preset in TRAINING_PRESETS.values()):
            kwargs["default"] = None
            help = f"{help} {_preset_default_text(dest)}"
        else:
            help = f"{help} (default: {kwargs.get('default')})"
        group.add_argument(*flags, help=help.replace("%", "%%"), **kwargs)

    flag = argparse.BooleanOptionalAction

    group = parser.add_argument_group("recipe")
    add("--preset", choices=sorted(TRAINING_PRESETS), default=DEFAULT_PRESET, help="U-Net + schedule + recipe.")
    add("--unet_preset", choices=sorted(UNET_PRESETS), help="DDPMUNet architecture preset.")
    add("--unet_overrides", type=json.loads, help='JSON of DDPMUNet config overrides of the U-Net preset, e.g. \'{"base_channels": 16}\' (the preset\'s apply only to its own --unet_preset).')  # fmt: skip
    add("--dropout", type=float, help="Dropout in the residual blocks.")
    add("--prediction_type", choices=PREDICTION_TYPES, default="epsilon", help="What the U-Net predicts.")
    add("--variance_type", choices=VARIANCE_TYPES, default=None, help="Reverse-process variance; None: fixed_small, or learned_range with --loss_type hybrid/vlb.")  # fmt: skip
    add("--loss_type", choices=LOSS_TYPES, default="simple", help="L_simple, L_hybrid (λ=0.001) or L_vlb.")
    add("--snr_gamma", type=float, help="min-SNR-γ weighting of L_simple (5 in the paper); 0 or None: off.")
    add("--ddpm_num_steps", type=int, help="Diffusion steps T.")
    add("--ddpm_beta_schedule", help="β schedule (linear, scaled_linear, squaredcos_cap_v2, sigmoid, ...).")
    add("--calibrate_variance", type=int, default=0, help="After the last step, estimate Γ_t (Analytic-DPM, Bao et al. 2022) from the first N training images, unaugmented, and store it in the saved scheduler config, so samplers can use analytic_variance=True (as `python -m hf_ddpm.calibrate` does; N >= 3); 0: off.")  # fmt: skip
    add("--timestep_spacing", choices=TIMESTEP_SPACINGS, help="How the saved pipeline spaces fewer sampling steps than T (its scheduler config; training uses all T). leading (diffusers' default) starts at T - T/steps and ends at t=0; trailing starts at t=T-1 (Lin et al. 2023) and ends at T/steps - 1. On the digits model trailing helps deterministic DDIM (η=0, the pipeline's default) at 20 steps and costs η=1 some quality (docs/benchmarks.md, bench_quality).")  # fmt: skip

    group = parser.add_argument_group("data")
    add("--dataset_name", default=None, help="Hub dataset id, a save_to_disk folder or an image folder; none: the built-in digits.")  # fmt: skip
    add("--dataset_config_name", default=None, help="Config name of the Hub dataset.")
    add("--train_data_dir", default=None, help="A local folder of images (imagefolder).")
    add("--image_column", default=None, help="The image column; None finds it.")
    add("--cache_dir", default=None, help="Where `datasets` caches downloads and imagefolders.")
    add("--resolution", type=int, help="Training image size (square).")
    add("--channels", type=int, choices=(1, 3), default=None, help="Image channels; None follows the data.")
    add("--center_crop", action=flag, help="Center crop (else random crop) after resizing the shorter side.")
    add("--random_flip", action=flag, help="Random horizontal flips.")
    add("--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes (0: the main process).")
    add("--cache_images_mb", type=int, default=1024, help="With no DataLoader workers and no --streaming: keep up to this many MiB of decoded, resized images in memory (per process) so later epochs skip decoding (same tensors; center crop or square images only); 0: off.")  # fmt: skip
    add("--streaming", action="store_true", default=False, help="Read the dataset as a stream (a `datasets` IterableDataset: nothing downloaded or converted up front), each process its own shards; needs --max_train_steps. Resumable: a checkpoint stores each process's place in the stream.")  # fmt: skip
    add("--shuffle_buffer_size", type=int, default=1000, help="With --streaming: rows in the shuffle buffer (the shard order is shuffled too).")  # fmt: skip

    group = parser.add_argument_group("optimisation")
    add("--train_batch_size", type=int, help="Batch size per process.")
    add("--num_epochs", type=int, default=None, help="Epochs; used only when --max_train_steps is not set.")
    add("--max_train_steps", type=int, help="Optimizer steps in total; overrides --num_epochs.")
    add("--gradient_accumulation_steps", type=int, default=1, help="Batches per optimizer step.")
    add("--gradient_checkpointing", action="store_true", default=False, help="Recompute activations in backward.")
    add("--learning_rate", type=float, help="Peak learning rate (AdamW).")
    add("--lr_scheduler", choices=LR_SCHEDULERS, help="Learning-rate schedule, counted in optimizer steps.")
    add("--lr_warmup_steps", type=int, help="Linear warmup, in optimizer steps.")
    add("--adam_beta1", type=float, default=0.9, help="AdamW β1.")
    add("--adam_beta2", type=float, default=0.999, help="AdamW β2.")
    add("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay (the paper uses none).")
    add("--adam_epsilon", type=float, default=1e-8, help="AdamW ε.")
    add("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm; 0 disables clipping.")
    add("--use_ema", action=flag, help="Keep an EMA of the weights; the saved pipeline gets the EMA weights.")
    add("--ema_inv_gamma", type=float, help="EMA warmup: decay = 1 - (1 + step / inv_gamma) ^ -power.")
    add("--ema_power", type=float, help="EMA warmup power.")
    add("--ema_max_decay", type=float, help="Maximum EMA decay.")
    add("--mixed_precision", choices=MIXED_PRECISIONS, default="no", help="Autocast dtype; the noise schedule and the loss stay in float32. fp16 needs a GPU.")  # fmt: skip
    add("--dynamo_backend", choices=DYNAMO_BACKENDS, default=None, help="torch.compile the U-Net's training forward with this TorchDynamo backend (flag named as accelerate launch names it): inductor generates kernels (needs a C++ compiler and Python headers on CPU, triton on GPUs; checked before the run); aot_eager/eager only capture graphs (debugging); no: eager PyTorch. Saved weights and checkpoints are the same either way. None: accelerate's setting (`accelerate launch --dynamo_backend`, else no).")  # fmt: skip
    add("--dynamo_mode", choices=DYNAMO_MODES, default=None, help="inductor's torch.compile mode: reduce-overhead adds CUDA graphs, max-autotune tries kernel variants (slow to compile). None: accelerate's setting (`accelerate launch --dynamo_mode`, else default).")  # fmt: skip
    add("--channels_last", action=flag, default=None, help="Conv weights and input batches in torch.channels_last (NHWC) memory format, the fast layout of tensor-core and oneDNN convolutions; --no-channels_last keeps NCHW. The same math either way. None: the U-Net's choice, channels_last on CPU and NCHW on GPUs.")  # fmt: skip
    add("--seed", type=int, default=0, help="Seed of everything random (per process: seed + rank).")

    group = parser.add_argument_group("outputs")
    add("--output_dir", default=None, help="The pipeline folder to write; None: outputs/<preset>-ddpm.")
    add("--logger", choices=LOGGERS, default="tensorboard", help="Experiment tracker.")
    add("--logging_dir", default="logs", help="Tracker folder, relative to --output_dir.")
    add("--sample_steps", type=int, default=50, help="DDIM steps for the sample grids.")
    add("--save_images_steps", type=int, help="Sample grids (EMA and raw model) every N steps; 0: only at the end.")
    add(
        "--checkpointing_steps", type=int, help="Save a resumable checkpoint (and the pipeline) every N steps; 0: off."
    )
    add("--checkpoints_total_limit", type=int, help="Keep at most this many checkpoints; 0 or None: all.")
    add("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint folder to resume from.")
    add("--push_to_hub", action="store_true", default=False, help="Upload the pipeline and model card to the Hub at each save.")  # fmt: skip
    add("--hub_model_id", default=None, help="Hub repo id; None: the output folder's name under your user.")
    add("--hub_private_repo", action="store_true", default=False, help="Create the Hub repo as private.")

    group = parser.add_argument_group("evaluation (the metrics of `python -m hf_ddpm.evaluate`, on a small budget)")
    add("--eval_steps", type=int, default=0, help="Evaluate every N steps, at step 0 and at the end, logging the seconds spent: the loss of the raw (and EMA) weights on a fixed batch (fixed noise and timesteps), and --eval_metrics of the saved (EMA) weights, each process on its share; 0: off.")  # fmt: skip
    add("--eval_metrics", default=None, help="Comma-separated: bpd (bits/dim of the first --eval_num_samples training images, unaugmented), fid (of --eval_num_samples DDIM samples against those images); none: the loss only. None: bpd,fid where FID has features (see --eval_features), else bpd.")  # fmt: skip
    add("--eval_num_samples", type=int, default=64, help="Evaluation budget over all processes: real images for bits/dim and samples for FID (>= 2).")  # fmt: skip
    add("--eval_sample_steps", type=int, default=20, help="DDIM steps of the FID samples.")
    add("--eval_features", default=None, help="FID features: digits, inception or dinov2[:MODEL_ID_OR_PATH]. None: digits on the built-in digits, else no FID.")  # fmt: skip
    add("--eval_bpd_mode", choices=("fast", "exact"), default="fast", help="Bits/dim: fast (a stratified estimate over t, with its standard error) or exact (all T steps).")  # fmt: skip
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `argv` (sys.argv when None), fill preset defaults and validate; argparse errors exit with code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_preset(args)
    try:
        validate_args(args)
    except ValueError as err:
        parser.error(str(err))
    return args


def apply_preset(args: argparse.Namespace) -> argparse.Namespace:
    """Fill every flag left at None with the preset's value, then the derived defaults."""
    skip = set()
    if args.num_epochs is not None:
        skip.add("max_train_steps")  # an explicit --num_epochs sets the length
    if args.unet_preset is not None:
        skip.add("unet_overrides")  # the preset's overrides belong to its own U-Net preset
    if args.loss_type == "vlb":
        skip.add("snr_gamma")  # min-SNR weights L_simple, which L_vlb alone does not have
    for key, value in TRAINING_PRESETS[args.preset].items():
        if key not in skip and getattr(args, key) is None:
            setattr(args, key, value)
    # 0 switches off what a preset switched on (argparse cannot take None).
    args.snr_gamma = args.snr_gamma or None
    args.checkpoints_total_limit = args.checkpoints_total_limit or None
    if args.output_dir is None:
        args.output_dir = f"outputs/{args.preset}-ddpm"
    if args.variance_type is None:
        args.variance_type = "learned_range" if args.loss_type in ("hybrid", "vlb") else "fixed_small"
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Raise a ValueError naming the flag for any value that cannot work, before anything is loaded."""
    positive = ["resolution", "train_batch_size", "gradient_accumulation_steps", "ddpm_num_steps", "sample_steps"]
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in ["max_train_steps", "num_epochs"]:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}.")
    for name in [
        "save_images_steps",
        "eval_steps",
        "checkpointing_steps",
        "lr_warmup_steps",
        "dataloader_num_workers",
        "cache_images_mb",
    ]:
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} must be >= 0, got {getattr(args, name)}.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 0:
        raise ValueError(f"--checkpoints_total_limit must be >= 0, got {args.checkpoints_total_limit}.")
    validate_eval_args(args)
    if not args.learning_rate > 0:
        raise ValueError(f"--learning_rate must be > 0, got {args.learning_rate}.")
    if not 0 <= args.ema_max_decay <= 1:
        raise ValueError(f"--ema_max_decay must lie in [0, 1], got {args.ema_max_decay}.")
    for name in ["ema_inv_gamma", "ema_power"]:  # the warmup 1 - (1 + step/inv_gamma)^-power needs both > 0
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}.")
    if args.sample_steps > args.ddpm_num_steps:
        raise ValueError(f"--sample_steps {args.sample_steps} exceeds --ddpm_num_steps {args.ddpm_num_steps}.")
    if args.shuffle_buffer_size < 1:
        raise ValueError(f"--shuffle_buffer_size must be >= 1, got {args.shuffle_buffer_size}.")
    if args.streaming and args.max_train_steps is None:
        raise ValueError(
            "--streaming needs --max_train_steps: a stream's length is unknown, so --num_epochs cannot set the length."
        )
    if args.dataset_name is not None and args.train_data_dir is not None:
        raise ValueError("give either --dataset_name or --train_data_dir, not both.")
    if args.unet_overrides is not None and not isinstance(args.unet_overrides, dict):
        raise ValueError(f"--unet_overrides must be a JSON object, got {args.unet_overrides!r}.")
    try:
        make_betas(args.ddpm_beta_schedule, args.ddpm_num_steps)
    except ValueError as err:
        raise ValueError(f"--ddpm_beta_schedule: {err}") from err
    learned = args.variance_type in LEARNED_VARIANCE_TYPES
    if args.calibrate_variance and (args.calibrate_variance < 3 or learned):
        allowed = "0 (off) or >= 3" if not learned else "0: the analytic variance replaces a fixed variance"
        raise ValueError(
            f"--calibrate_variance {args.calibrate_variance} with --variance_type {args.variance_type}: allowed "
            f"{allowed} (the Monte Carlo estimate needs at least 3 images)."
        )
    try:
        check_loss_config(args.loss_type, args.variance_type, learned, args.snr_gamma)
    except ValueError as err:
        raise ValueError(f"--loss_type {args.loss_type} / --variance_type {args.variance_type}: {err}") from err
    if args.dynamo_mode not in (None, "default") and args.dynamo_backend not in (None, "inductor"):
        raise ValueError(f"--dynamo_mode {args.dynamo_mode} applies to --dynamo_backend inductor only.")
    if args.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--mixed_precision fp16 needs a CUDA GPU; on CPU use bf16 or no.")
