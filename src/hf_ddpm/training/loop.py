"""The training loop (accelerate): data -> q(x_t|x_0) -> U-Net -> loss -> AdamW -> EMA -> checkpoints -> pipeline.

One optimizer step is `--gradient_accumulation_steps` batches; step counts (`--max_train_steps`, the LR schedule,
checkpoints, grids) are optimizer steps. Under `accelerate launch` every process trains on its shard of each
epoch (accelerate's `prepare`), and only the main process writes files, logs images or pushes. With `--streaming`
each process reads its own part of the stream (`data.shard_stream`), epoch after epoch at its own pace, until
`--max_train_steps` (`batches.StreamBatches`).

Reproducibility: the noise and timesteps come from the global torch RNG, seeded with `seed + rank` and saved per
process in every checkpoint; the data order is a function of (seed, epoch) (`EpochShuffleSampler`; a stream's of
(seed, epoch, processes, workers), and each process's place in it is saved per process too); sampling
and evaluation use their own generators. A run resumed from a checkpoint therefore continues bit for bit (on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration, TorchDynamoPlugin, set_seed
from datasets.distributed import split_dataset_by_node
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..atomic_files import atomic_write
from ..compilation import compile_kwargs, compile_problem
from ..data import (
    SkippedImages,
    find_image_column,
    infer_channels,
    load_image_dataset,
    prepare_dataset,
    set_epoch,
    shard_stream,
)
from ..evaluator import Evaluator
from ..losses import training_losses
from ..models.unet import DDPMUNet
from ..pipeline import HFDDPMPipeline
from ..schedulers import DDPMPosteriorScheduler
from .args import parse_args
from .batches import StreamBatches, build_dataloader, eval_batch
from .checkpoints import (
    check_checkpoint_signature,
    list_checkpoints,
    read_checkpoint_state,
    read_stream_state,
    remove_partial_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from .components import build_noise_scheduler, build_unet, run_signature
from .ema_state import register_ema_checkpointing
from .flat_params import FlatEMA, FlatParameters, register_flat_checkpointing
from .hub import create_hub_repo, push_folder
from .model_card import TrainingMetrics, render_model_card, write_model_card
from .output import check_output_dir, clean_interrupted_writes, save_pipeline, write_run_config
from .periodic_eval import build_evaluator, eval_logs
from .samples import sample_images, save_grid

logger = logging.getLogger(__name__)

MAX_NONFINITE_STEPS = 10  # optimizer steps in a row with a NaN/inf loss before training stops
LOSS_WINDOW = 50  # steps averaged for the reported loss
GRID_IMAGES = 16
METRICS_FILE = "training_metrics.json"


class TrainingInputError(ValueError):
    """Flags, data or output folder that cannot work, found before the first step (nothing has been written)."""


class TrainingDiverged(RuntimeError):
    """The loss was NaN/inf for MAX_NONFINITE_STEPS optimizer steps in a row; the checkpoints are untouched."""


@dataclass
class TrainResult:
    """What `train` produced: the pipeline folder, the Hub repo (if pushed) and the measured metrics."""

    output_dir: Path
    repo_id: str | None
    metrics: TrainingMetrics


@dataclass
class _Setup:
    dataset: datasets.Dataset | datasets.IterableDataset  # a stream: this process's part of it (--streaming)
    channels: int
    unet: DDPMUNet
    noise_scheduler: DDPMPosteriorScheduler
    signature: dict[str, Any]
    checkpoint: Path | None
    resume_step: int
    progress: dict[str, Any]  # the resumed run's measurements so far (empty for a new run)
    evaluator: Evaluator | None = None  # --eval_metrics at each --eval_steps, on every process


def _check_stream_parts(raw: datasets.IterableDataset, accelerator: Accelerator) -> None:
    """Raise the same ValueError on every process when any process's part of the stream has no rows (fewer rows or
    shards than processes): that process would fail at its first batch while the others train on.

    It peeks at the unshuffled split, which reads one row instead of filling a shuffle buffer; the shuffle changes
    which rows a process gets, not how many, unless some shards are empty (StreamBatches still stops on an empty part).
    """
    rank, world_size = accelerator.process_index, accelerator.num_processes
    has_rows = next(iter(split_dataset_by_node(raw, rank=rank, world_size=world_size)), None) is not None
    found = accelerator.gather(torch.tensor([int(has_rows)], device=accelerator.device)).tolist()
    empty = [index for index, rows in enumerate(found) if not rows]
    if empty:
        which = f"process {empty[0]}" if len(empty) == 1 else f"processes {empty}"
        raise ValueError(
            f"{which} of {len(found)} got an empty part of the stream: the dataset has fewer rows (or shards) than "
            "there are processes. Launch fewer processes, or train without --streaming."
        )


def _setup(args: argparse.Namespace, accelerator: Accelerator) -> _Setup:
    """Everything that can fail because of the user's input, checked before anything is written."""
    output_dir = Path(args.output_dir)
    check_output_dir(output_dir)
    with accelerator.main_process_first():  # the first process fills the datasets cache, the others read it
        raw = load_image_dataset(
            args.dataset_name,
            args.dataset_config_name,
            args.train_data_dir,
            args.image_column,
            cache_dir=args.cache_dir,
            streaming=args.streaming,
        )
    column = find_image_column(raw, args.image_column)
    channels = args.channels or infer_channels(raw, column)  # from the whole stream's first rows: alike everywhere
    part = raw
    if args.streaming:
        rank, world_size = accelerator.process_index, accelerator.num_processes
        part = shard_stream(raw, rank, world_size, args.seed, args.shuffle_buffer_size)
        if world_size > 1:
            _check_stream_parts(raw, accelerator)
    # Workers get a fresh copy of the transform each epoch (they are not persistent, see `set_epoch`): no cache there.
    cache_mb = args.cache_images_mb if not args.streaming and args.dataloader_num_workers == 0 else 0
    dataset = prepare_dataset(
        part, column, args.resolution, args.center_crop, args.random_flip, channels, seed=args.seed,
        cache_bytes=cache_mb * 2**20,
    )  # fmt: skip
    set_seed(args.seed)  # the same initial weights on every process
    unet = build_unet(args, channels)
    noise_scheduler = build_noise_scheduler(args)
    num_rows = None if args.streaming else len(raw)
    signature = run_signature(args, unet, noise_scheduler, accelerator.num_processes, num_rows)
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    resume_step = check_checkpoint_signature(checkpoint, signature) if checkpoint is not None else 0
    earlier = list_checkpoints(output_dir)
    if args.resume_from_checkpoint is None and earlier:
        # Two runs' checkpoints in one folder would be rotated and resumed as one run.
        names = ", ".join(p.name for _, p in earlier)
        raise ValueError(
            f"--output_dir {args.output_dir!r} already holds checkpoints of an earlier run ({names}). Pass "
            "--resume_from_checkpoint latest to continue it, or use a new --output_dir (or delete them) to start over."
        )
    progress = read_checkpoint_state(checkpoint).get("progress", {}) if checkpoint is not None else {}
    evaluator = build_evaluator(args, raw, column, channels, accelerator)  # last: it may take seconds
    return _Setup(
        dataset, channels, unet, noise_scheduler, signature, checkpoint, resume_step, progress, evaluator=evaluator
    )


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    """Flags as TensorBoard hparams accept them (scalars and strings only)."""
    plain = (int, float, str, bool)
    return {k: v if isinstance(v, plain) else json.dumps(v) for k, v in vars(args).items()}


class _Trainer:
    """The state of one run; `run()` trains, saves and pushes."""

    def __init__(self, args: argparse.Namespace, accelerator: Accelerator, setup: _Setup):
        self.args, self.accelerator, self.setup = args, accelerator, setup
        self.output_dir = Path(args.output_dir)
        self.device = accelerator.device
        self.noise_scheduler = setup.noise_scheduler
        self.diffusion = setup.noise_scheduler.diffusion
        self.skipped = SkippedImages()
        self.repo_id: str | None = None
        self.latest_grid: str | None = None
        self.grid_step = -1
        self.eval_history: list[dict[str, Any]] = list(setup.progress.get("eval_history", []))
        self.start_time = time.perf_counter()
        self.eval_loss: float | None = None
        self.losses: deque[float] = deque(maxlen=LOSS_WINDOW)
        self.overhead = 0.0  # seconds spent sampling, evaluating and saving (excluded from throughput)
        self.images_seen = 0
        self._export_copy: DDPMUNet | None = None

        unet = setup.unet
        if args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # A stream is read through StreamBatches and not prepared (accelerate would shard it again, across processes
        # that already read disjoint parts), so `self.loader` is None for it.
        self.stream: StreamBatches | None = None
        loader = None
        if args.streaming:
            self.stream = StreamBatches(setup.dataset, args.train_batch_size, args.dataloader_num_workers, args.seed)
        else:
            loader = build_dataloader(setup.dataset, args.train_batch_size, args.dataloader_num_workers, args.seed)
        # --channels_last: the weights take the activations' layout before DDP and the optimizer state see them.
        self.channels_last = args.channels_last if args.channels_last is not None else self.device.type == "cpu"
        unet.channels_last = self.channels_last
        unet.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        self.model = accelerator.prepare(unet)
        self.raw = accelerator.unwrap_model(self.model)
        # Re-seated in one buffer once `prepare` has placed them (moving them to "cpu:0" under multi-CPU copies them):
        # the optimizer, clipping, zeroing and EMA then each run one kernel over all of them. DDP keeps the same
        # Parameter objects and copies its reduced buckets into their gradients in place.
        self.flat = FlatParameters(self.raw.parameters())
        optimizer = torch.optim.AdamW(
            [self.flat.param],
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            fused=True,  # one kernel for the whole update instead of ~10 ops over the buffer
        )
        self.flat.attach_optimizer(optimizer)
        self.optimizer, self.loader = accelerator.prepare(optimizer, loader)
        register_flat_checkpointing(accelerator)
        # --dynamo_backend: a compiled wrapper (over the DDP module, as accelerate would compile it) for the training
        # forward only. accelerate's own compile would put it in its model list, and `save_state` would then write
        # `_orig_mod.`-prefixed weights that an uncompiled run cannot resume; sampling and evaluation at other batch
        # sizes would recompile it. So checkpoints, EMA, evaluation and sampling use the plain module.
        dynamo = _dynamo_kwargs(args)
        self.train_model = torch.compile(self.model, **dynamo) if dynamo is not None else self.model
        if self.stream is None:
            self.steps_per_epoch = math.ceil(len(self.loader) / args.gradient_accumulation_steps)
            self.max_steps = args.max_train_steps or args.num_epochs * self.steps_per_epoch
            self.num_epochs = math.ceil(self.max_steps / self.steps_per_epoch)
        else:  # a stream's length is unknown: --max_train_steps alone sets the run's (args.py requires it)
            self.max_steps = args.max_train_steps
        # Not prepared by accelerate, which would step it once per process: the schedule counts optimizer steps.
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=self.optimizer.optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=self.max_steps,
        )
        accelerator.register_for_checkpointing(self.lr_scheduler)
        self.ema: EMAModel | None = None
        self.flat_ema: FlatEMA | None = None
        if args.use_ema:
            self.ema = EMAModel(
                self.flat.params,
                decay=args.ema_max_decay,
                use_ema_warmup=True,
                inv_gamma=args.ema_inv_gamma,
                power=args.ema_power,
                foreach=True,
                model_cls=DDPMUNet,
                model_config=self.raw.config,
            )
            self.ema.to(self.device)
            self.flat_ema = FlatEMA(self.ema, self.flat)
            register_ema_checkpointing(accelerator, self.ema)
        self.global_step = 0
        if setup.checkpoint is not None:
            logger.info("resuming from %s (step %d)", setup.checkpoint, setup.resume_step)
            accelerator.load_state(str(setup.checkpoint))
            self.global_step = setup.resume_step
            if self.ema is not None:
                self.ema.to(self.device)
                self.flat_ema.rebind()  # loading replaced the shadow tensors
            if self.stream is not None:  # each process continues where it was in its own part of the stream
                self.stream.load_state_dict(read_stream_state(setup.checkpoint, accelerator.process_index))
        # Each process draws its own noise from here on (seed + rank); a resumed run got its RNG from load_state.
        if setup.checkpoint is None:
            set_seed(args.seed, device_specific=True)

    # --- the weights to sample from and to save ------------------------------------------------------------------

    def export_unet(self) -> DDPMUNet:
        """The weights to save, in a U-Net of their own: the EMA's when EMA is on, else the trained ones (copied, as
        the trained parameters share one buffer, which safetensors would not save as separate weights)."""
        if self._export_copy is None:
            self._export_copy = DDPMUNet.from_config(self.raw.config).to(self.device)
        if self.ema is None:
            self._export_copy.load_state_dict(self.raw.state_dict())
        else:
            self.ema.copy_to(self._export_copy.parameters())
        return self._export_copy

    # --- one batch -------------------------------------------------------------------------------------------------

    def _forward_loss(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, model: torch.nn.Module):
        """Loss terms of a batch; the network may run in fp16/bf16, the schedule and loss math stay float32."""
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        with self.accelerator.autocast():
            out = model(x_t, t).sample
        args = self.args
        return training_losses(
            self.diffusion, out.float(), x0, noise, x_t, t,
            args.prediction_type, args.variance_type, args.loss_type, args.snr_gamma,
        )  # fmt: skip

    def _micro_step(self, batch: dict[str, Any]) -> torch.Tensor:
        """Forward and backward of one batch (inside gradient accumulation); returns the process-mean loss."""
        x0 = batch["pixel_values"].to(self.device, torch.float32)
        real = x0.shape[0] > 0
        if not real:  # every image unreadable: a zero-weight batch keeps all processes' collectives in step
            size = self.args.resolution
            x0 = torch.zeros(1, self.setup.channels, size, size, device=self.device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.diffusion.num_timesteps, (x0.shape[0],), device=self.device)
        if self.channels_last:  # drawn in NCHW above (randn_like follows its input's layout), so the same noise
            x0, noise = (x.contiguous(memory_format=torch.channels_last) for x in (x0, noise))
        with self.accelerator.accumulate(self.model):
            loss = self._forward_loss(x0, noise, t, self.train_model).loss.mean() * float(real)
            mean_loss = self.accelerator.reduce(loss.detach(), reduction="mean")
            # Backward even on a NaN loss: DDP expects one after every forward; those gradients are dropped below.
            self.accelerator.backward(loss)
            # Read after queueing the backward: reading it before would leave a GPU idle while the host queues it.
            self._window_finite &= bool(torch.isfinite(mean_loss))
            if self.accelerator.sync_gradients:
                if self._window_finite:
                    if self.args.max_grad_norm > 0:
                        self.accelerator.clip_grad_norm_([self.flat.param], self.args.max_grad_norm)
                    self.optimizer.step()
                self.flat.zero_grad()
        self.images_seen += x0.shape[0] * real * self.accelerator.num_processes
        return mean_loss

    # --- periodic work --------------------------------------------------------------------------------------------

    def _side_work(self, fn, *args: Any) -> Any:
        """Run saving/sampling/evaluation outside the training RNG stream (a checkpoint stores that stream, so
        anything drawn from it here, e.g. initialising the EMA export U-Net, would make a resumed run diverge)
        and outside the throughput clock."""
        start = time.perf_counter()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                return fn(*args)
        finally:
            self.overhead += time.perf_counter() - start

    def save(self, checkpoint: bool, final: bool = False) -> None:
        """Checkpoint (all processes), then the pipeline, model card and push (main process)."""
        args = self.args
        if checkpoint:
            save_checkpoint(
                self.accelerator,
                self.output_dir,
                self.global_step,
                self.setup.signature,
                args.checkpoints_total_limit,
                progress=self.progress(),
                stream_state=self.stream.state_dict() if self.stream is not None else None,
            )
        if not self.accelerator.is_main_process:
            return
        unet = self.export_unet()
        save_pipeline(HFDDPMPipeline(unet=unet, scheduler=self.noise_scheduler), self.output_dir)
        metrics = self.metrics()
        atomic_write(self.output_dir / METRICS_FILE, json.dumps(asdict(metrics), indent=2))
        card_id = self.repo_id or os.fspath(self.output_dir)
        card = render_model_card(card_id, args, metrics, self.latest_grid, self.accelerator.num_processes)
        write_model_card(self.output_dir, card)
        if self.repo_id is not None:
            try:
                url = push_folder(self.output_dir, self.repo_id, f"hf_ddpm training: step {self.global_step}")
                logger.info("pushed step %d to %s", self.global_step, url)
            except Exception as err:
                if final:
                    raise RuntimeError(
                        f"training finished and {self.output_dir} is complete, but pushing it to the Hub repo "
                        f"{self.repo_id!r} failed: {err}"
                    ) from err
                logger.warning("pushing step %d to %s failed (will retry at the next save): %s", self.global_step,
                               self.repo_id, err)  # fmt: skip

    def log_grids(self) -> None:
        """Sample grids of the EMA and the raw model into samples/ and the tracker (main process)."""
        args = self.args
        models = {"raw": self.raw} if self.ema is None else {"ema": self.export_unet(), "raw": self.raw}
        for name, unet in models.items():
            images = sample_images(unet, dict(self.noise_scheduler.config), GRID_IMAGES, args.sample_steps, args.seed)
            relative = f"samples/step-{self.global_step:06d}-{name}.png"
            save_grid(images, self.output_dir / relative)
            if name == next(iter(models)):
                self.latest_grid = relative
            if args.logger == "tensorboard":
                writer = self.accelerator.get_tracker("tensorboard", unwrap=True)
                writer.add_images(f"samples/{name}", images, self.global_step, dataformats="NHWC")
        self.grid_step = self.global_step

    @torch.no_grad()
    def evaluate(self, fixed: dict[str, torch.Tensor] | None) -> None:
        """One evaluation; every process calls it. `--eval_metrics` of the saved (EMA) weights, each process on its
        share (`periodic_eval`); on the main process also the loss of the raw (and EMA) weights on the `fixed`
        batch. The main process logs it all, with the seconds spent, as eval/* (tracker, console, eval_history)."""
        started = time.perf_counter()
        self.last_eval_step = self.global_step
        models = {"raw": self.raw} if self.ema is None else {"ema": self.export_unet(), "raw": self.raw}
        modes = {name: unet.training for name, unet in models.items()}
        logs: dict[str, float] = {}
        try:
            for unet in models.values():
                unet.eval()
            if fixed is not None:
                x0, noise, t = (fixed[k].to(self.device) for k in ("x0", "noise", "t"))
                for name, unet in models.items():
                    logs[f"eval/loss_{name}"] = float(self._forward_loss(x0, noise, t, unet).loss.mean())
            if self.setup.evaluator is not None:
                pipe = HFDDPMPipeline(unet=next(iter(models.values())), scheduler=self.noise_scheduler)
                pipe.set_progress_bar_config(disable=True)
                logs.update(eval_logs(self.setup.evaluator(pipe)))
        finally:
            for name, unet in models.items():
                unet.train(modes[name])
        if not self.accelerator.is_main_process:
            return
        logs["eval/seconds"] = round(time.perf_counter() - started, 2)
        self.eval_loss = logs.get(f"eval/loss_{next(iter(models))}", self.eval_loss)
        self.eval_history.append({"step": self.global_step, **logs})
        self.accelerator.log(logs, step=self.global_step)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in logs.items() if k != "eval/seconds")
        logger.info("evaluation at step %d took %.1f s: %s", self.global_step, logs["eval/seconds"], shown)

    @torch.no_grad()
    def _check_processes_agree(self) -> None:
        """Every process must end with the same weights (and EMA); a float64 checksum of each is compared."""
        if self.accelerator.num_processes == 1:
            return
        tensors = list(self.raw.parameters()) + (self.ema.shadow_params if self.ema is not None else [])
        flat = torch.cat([p.detach().double().flatten() for p in tensors])
        positions = torch.arange(flat.numel(), device=flat.device, dtype=torch.float64) % 1009
        checksum = torch.stack([flat.sum(), (flat * flat).sum(), (flat * positions).sum()])
        gathered = self.accelerator.gather(checksum[None]).cpu()
        if not bool((gathered == gathered[0]).all()):
            raise RuntimeError(f"the processes ended with different weights (checksums per process: {gathered})")
        logger.info(
            "all %d processes hold the same weights%s (checksum %s)",
            self.accelerator.num_processes,
            " and EMA" if self.ema is not None else "",
            [f"{v:.12g}" for v in gathered[0].tolist()],
        )

    def progress(self) -> dict[str, Any]:
        """Running measurements of the whole run, including what a resumed checkpoint had measured before."""
        prior = self.setup.progress
        elapsed = time.perf_counter() - self.start_time
        last_loss = sum(self.losses) / len(self.losses) if self.losses else prior.get("final_loss")
        return {
            "train_seconds": prior.get("train_seconds", 0.0) + elapsed,
            "compute_seconds": prior.get("compute_seconds", 0.0) + elapsed - self.overhead,
            "images_seen": prior.get("images_seen", 0) + self.images_seen,
            "final_loss": last_loss,
            "skipped_images": prior.get("skipped_images", 0) + self.skipped.count,
            "eval_loss": self.eval_loss if self.eval_loss is not None else prior.get("eval_loss"),
            "eval_history": list(self.eval_history),  # starts with the resumed checkpoint's
        }

    def metrics(self) -> TrainingMetrics:
        p = self.progress()
        return TrainingMetrics(
            global_step=self.global_step,
            final_loss=p["final_loss"],
            train_seconds=p["train_seconds"],
            images_per_second=p["images_seen"] / max(p["compute_seconds"], 1e-9),
            num_parameters=sum(q.numel() for q in self.raw.parameters()),
            skipped_images=p["skipped_images"],
            eval_loss=p["eval_loss"],
            eval_history=p["eval_history"],
        )

    # --- the loop -------------------------------------------------------------------------------------------------

    def _epochs(self) -> Iterable[int]:
        """The epochs to train, from the one a resumed run stopped in; a stream's without end (the loop stops at
        --max_train_steps)."""
        if self.stream is not None:
            return self.stream.epochs()
        return range(self.global_step // self.steps_per_epoch, self.num_epochs)

    def _epoch_batches(self, epoch: int) -> Iterable[dict[str, Any]]:
        """The batches of `epoch` to train on: in the epoch a resumed run starts in, those after its checkpoint."""
        if self.stream is not None:
            return self.stream.epoch_batches(epoch)
        set_epoch(self.setup.dataset, epoch)
        self.loader.set_epoch(epoch)
        # Each earlier epoch made exactly steps_per_epoch steps (accelerate closes the last accumulation window at the
        # end of the data), so steps beyond those are this epoch's part that the resumed checkpoint trained on.
        done = self.global_step - epoch * self.steps_per_epoch
        if done:
            return self.accelerator.skip_first_batches(self.loader, done * self.args.gradient_accumulation_steps)
        return self.loader

    def run(self) -> TrainResult:
        args, accelerator, main = self.args, self.accelerator, self.accelerator.is_main_process
        if main and args.push_to_hub:
            self.repo_id = create_hub_repo(self.output_dir, args.hub_model_id, args.hub_private_repo)
        if args.logger != "none":
            accelerator.init_trackers("hf_ddpm", config=_tracker_config(args))
        fixed = None
        if main and args.eval_steps:
            fixed = eval_batch(self.setup.dataset, self.diffusion.num_timesteps, args.seed)
        self.last_eval_step = self.eval_history[-1]["step"] if self.eval_history else -1  # alike on every process
        self.start_time = time.perf_counter()
        if args.eval_steps and self.global_step == 0:
            self._side_work(self.evaluate, fixed)

        progress = tqdm(
            total=self.max_steps,
            initial=self.global_step,
            disable=not main,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        nonfinite = 0
        saved_step = self.global_step if self.setup.checkpoint is not None else -1
        self._window_finite, window_losses = True, []
        self.model.train()
        for epoch in self._epochs():
            if self.global_step >= self.max_steps:
                break
            for batch in self._epoch_batches(epoch):
                if self.skipped.update(batch):
                    logger.warning("%d unreadable images skipped so far", self.skipped.count)
                window_losses.append(self._micro_step(batch))
                if not accelerator.sync_gradients:
                    continue
                self.global_step += 1
                self.lr_scheduler.step()
                step_loss = float(torch.stack(window_losses).mean())
                if self._window_finite:
                    nonfinite = 0
                    if self.flat_ema is not None:
                        self.flat_ema.step()
                    self.losses.append(step_loss)
                else:
                    nonfinite += 1
                    logger.warning(
                        "step %d: loss is %s; update skipped (%d/%d in a row)",
                        self.global_step, step_loss, nonfinite, MAX_NONFINITE_STEPS,
                    )  # fmt: skip
                    if nonfinite >= MAX_NONFINITE_STEPS:
                        progress.close()
                        raise TrainingDiverged(
                            f"the loss was NaN/inf for {MAX_NONFINITE_STEPS} optimizer steps in a row (up to step "
                            f"{self.global_step}); training stopped. The checkpoints in {self.output_dir} are "
                            "untouched (none is written while the loss is not finite): lower --learning_rate or "
                            "--max_grad_norm, or use --mixed_precision no, and resume from the last one."
                        )
                self._window_finite, window_losses = True, []
                lr = self.lr_scheduler.get_last_lr()[0]
                accelerator.log({"train/loss": step_loss, "train/lr": lr, "train/epoch": epoch}, step=self.global_step)
                progress.update(1)
                if self.losses:
                    progress.set_postfix(
                        loss=f"{sum(self.losses) / len(self.losses):.4f}", lr=f"{lr:.2e}", refresh=False
                    )
                # Evaluation first (every process: it gathers), so that a checkpoint of this step includes it.
                if args.eval_steps and self.global_step % args.eval_steps == 0:
                    self._side_work(self.evaluate, fixed)
                if nonfinite == 0 and args.checkpointing_steps and self.global_step % args.checkpointing_steps == 0:
                    self._side_work(self.save, True)
                    saved_step = self.global_step
                if main and args.save_images_steps and self.global_step % args.save_images_steps == 0:
                    self._side_work(self.log_grids)
                if self.global_step >= self.max_steps:
                    break
        progress.close()

        accelerator.wait_for_everyone()
        if main and self.grid_step != self.global_step:
            self._side_work(self.log_grids)
        if args.eval_steps and self.last_eval_step != self.global_step:
            self._side_work(self.evaluate, fixed)
        # The last state is always checkpointed (when checkpointing is on), so a finished run can be extended.
        self._side_work(self.save, bool(args.checkpointing_steps) and saved_step != self.global_step, True)
        self._check_processes_agree()
        if self.skipped.count:
            logger.warning("%d unreadable images were skipped in total (each time one was drawn)", self.skipped.count)
        accelerator.wait_for_everyone()
        if accelerator.num_processes > 1:
            self._side_work(self._free_ddp_wrapper)
        accelerator.end_training()
        return TrainResult(self.output_dir, self.repo_id, self.metrics())

    def _free_ddp_wrapper(self) -> None:
        """Free the DistributedDataParallel wrapper before `end_training` destroys the process group.

        DDP's C++ Reducer owns a reference to the group, and pybind frees the Reducer with the GIL held. Were it the
        last owner, the group's destructor would join gloo's worker threads while one of them may still need the GIL
        to free the tensors of the last collectives: a deadlock at exit (one run in ~6 with 2 gloo processes on a
        loaded machine). Freed first, the Reducer is not the last owner, and `destroy_process_group` frees the group
        through its Python object, which releases the GIL."""
        self.model = self.train_model = None
        self.accelerator.free_memory()  # drops accelerate's own references to the prepared model and optimizer


def train(args: argparse.Namespace) -> TrainResult:
    """Train with the parsed flags (see `hf_ddpm.training.args`) and write the pipeline folder.

    Raises:
        TrainingInputError: bad flags, data or output folder (before anything is written).
        TrainingDiverged: NaN/inf loss for MAX_NONFINITE_STEPS steps in a row.
    """
    output_dir = Path(args.output_dir)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    # accelerate keeps its state (mixed precision, ...) per process; reset it so that train() can be called again
    # in one process with other flags (the demo, benchmarks, tests). The process group (PartialState) stays.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    accelerator = Accelerator(
        # `accelerate launch --multi_gpu` on a machine without GPUs would run every process alone (accelerate picks
        # gloo on CPU only when told `cpu=True`), so several launched processes and no accelerator mean CPU DDP.
        cpu=world_size > 1 and not _has_accelerator(),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        dynamo_plugin=TorchDynamoPlugin(backend="no"),  # the trainer compiles (see _Trainer.__init__)
        log_with=None if args.logger == "none" else args.logger,
        project_config=ProjectConfiguration(
            project_dir=os.fspath(output_dir), logging_dir=os.fspath(output_dir / args.logging_dir)
        ),
    )
    if accelerator.num_processes != world_size:
        raise TrainingInputError(
            f"{world_size} processes were launched, but accelerate sees {accelerator.num_processes}: each would "
            "train alone and they would overwrite each other's output. Check the `accelerate launch` flags."
        )
    check_distributed_type(accelerator.distributed_type)
    dynamo = _dynamo_kwargs(args)
    problem = compile_problem(dynamo["backend"], accelerator.device) if dynamo is not None else None
    if problem is not None:
        raise TrainingInputError(f"--dynamo_backend {dynamo['backend']}: {problem}")
    try:
        setup = _setup(args, accelerator)
    except (ValueError, OSError, ImportError) as err:  # OSError covers FileNotFoundError and ConnectionError
        raise TrainingInputError(str(err)) from err
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        clean_interrupted_writes(output_dir)
        remove_partial_checkpoints(output_dir)
        write_run_config(output_dir, {**vars(args), "num_processes": accelerator.num_processes})
    accelerator.wait_for_everyone()
    return _Trainer(args, accelerator, setup).run()


def _dynamo_kwargs(args: argparse.Namespace) -> dict[str, Any] | None:
    """torch.compile's arguments from --dynamo_backend / --dynamo_mode, else from accelerate's launch settings
    (ACCELERATE_DYNAMO_*, read by its TorchDynamoPlugin); None when compilation is off."""
    plugin = TorchDynamoPlugin(backend=args.dynamo_backend, mode=args.dynamo_mode)
    backend = plugin.backend.value.lower()
    if backend == "no":
        return None
    try:
        return compile_kwargs(backend, plugin.mode, bool(plugin.fullgraph), plugin.dynamic)
    except ValueError as err:
        raise TrainingInputError(f"--dynamo_mode: {err}") from err


# Sharded-model engines: the EMA, the run signature and the pipeline export assume that every process holds the whole
# model (DDP), and the models here (35.7M parameters: ~0.6 GB with AdamW state and EMA) fit one GPU, where DDP is the
# fastest choice; sharding would only add communication.
UNSUPPORTED_DISTRIBUTED_TYPES = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)


def check_distributed_type(distributed_type: DistributedType) -> None:
    """Raise TrainingInputError for an accelerate mode whose sharded model the trainer cannot hold (see above)."""
    if distributed_type in UNSUPPORTED_DISTRIBUTED_TYPES:
        raise TrainingInputError(
            f"accelerate's {distributed_type.value} mode is not supported: hf_ddpm's EMA, checkpoints and pipeline "
            "export need every process to hold the whole model. Use DDP (`accelerate launch --multi_gpu`, or "
            "`distributed_type: MULTI_GPU` in the accelerate config); see docs/scale.md."
        )


def _has_accelerator() -> bool:
    if hasattr(torch, "accelerator"):  # torch >= 2.6
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def _configure_logging() -> None:
    """INFO on the main process, warnings only on the others (RANK is set by accelerate launch / torchrun)."""
    main = int(os.environ.get("RANK", "0")) == 0
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if main else logging.WARNING,
    )
    for name in ("accelerate", "torch", "PIL"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> TrainResult:
    """The `train.py` command: parse flags, train, and turn input errors into a one-line message (exit code 2)
    and divergence into exit code 1."""
    args = parse_args(argv)
    _configure_logging()
    try:
        result = train(args)
    except TrainingInputError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingDiverged as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    if int(os.environ.get("RANK", "0")) == 0:
        m = result.metrics
        print(
            f"done: {m.global_step} steps, final loss {m.final_loss if m.final_loss is None else round(m.final_loss, 4)}, "
            f"{m.train_seconds:.0f} s, {m.images_per_second:.1f} images/s; pipeline in {result.output_dir}"
            + (f"; pushed to {result.repo_id}" if result.repo_id else "")
        )
    return result
