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

The pieces: `launch` builds the Accelerator, `run_setup` loads and checks the inputs, `train_step` trains on one
batch, `progress` measures, `periodic_eval` evaluates, `publish` writes and pushes what each save hands the user.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..calibrate import calibrate_pipeline
from ..data import set_epoch
from ..models.unet import DDPMUNet
from ..pipeline import HFDDPMPipeline
from ..progress import progress_bar
from .batches import StreamBatches, build_dataloader, eval_batch
from .checkpoints import read_stream_state, remove_partial_checkpoints, save_checkpoint
from .distributed import check_processes_agree
from .ema_state import register_ema_checkpointing
from .errors import TrainingDiverged, TrainingInputError
from .flat_params import FlatEMA, FlatParameters, register_flat_checkpointing
from .hub import create_hub_repo
from .launch import build_accelerator, dynamo_kwargs, tracker_config
from .model_card import TrainingMetrics, render_model_card
from .output import clean_interrupted_writes, write_run_config
from .periodic_eval import evaluate_models
from .progress import RunProgress
from .publish import push_step, write_pipeline_folder
from .run_setup import RunSetup, setup_run
from .samples import sample_images, save_grid
from .train_step import TrainStep

logger = logging.getLogger(__name__)

MAX_NONFINITE_STEPS = 10  # optimizer steps in a row with a NaN/inf loss before training stops
GRID_IMAGES = 16


@dataclass
class TrainResult:
    """What `train` produced: the pipeline folder, the Hub repo (if pushed) and the measured metrics."""

    output_dir: Path
    repo_id: str | None
    metrics: TrainingMetrics


class _Trainer:
    """The state of one run; `run()` trains, saves and pushes."""

    def __init__(self, args: argparse.Namespace, accelerator: Accelerator, setup: RunSetup):
        self.args, self.accelerator, self.setup = args, accelerator, setup
        self.output_dir = Path(args.output_dir)
        self.device = accelerator.device
        self.noise_scheduler = setup.noise_scheduler
        self.diffusion = setup.noise_scheduler.diffusion
        self.progress = RunProgress(setup.progress)
        self.progress_bar: tqdm | None = None  # opened by `run`, after the evaluation of the starting weights
        self.repo_id: str | None = None  # created by `run` with --push_to_hub
        self.latest_grid: str | None = None
        self.grid_step = -1
        self.last_eval_step = self.progress.eval_history[-1]["step"] if self.progress.eval_history else -1
        self.epoch = 0
        self.nonfinite_steps = 0  # optimizer steps in a row with a NaN/inf loss
        self._export_copy: DDPMUNet | None = None

        self.stream, loader = self._build_data()
        self.channels_last = args.channels_last if args.channels_last is not None else self.device.type == "cpu"
        self.model, self.raw, self.flat = self._build_model()
        self.optimizer, self.loader = self._build_optimizer(loader)
        self.train_model = self._build_compiled_forward()
        self.train_step = TrainStep(
            args, accelerator, self.noise_scheduler, self.flat, self.optimizer,
            channels=setup.channels, channels_last=self.channels_last,
        )  # fmt: skip
        self.steps_per_epoch, self.num_epochs, self.max_steps = self._count_steps()
        self.lr_scheduler = self._build_lr_scheduler()
        self.ema, self.flat_ema = self._build_ema()
        self.global_step = self._resume()
        self.saved_step = self.global_step if setup.checkpoint is not None else -1  # the last step checkpointed
        self.fixed_batch = self._build_fixed_batch()

    # --- building the run, step by step ---------------------------------------------------------------------------

    def _build_data(self) -> tuple[StreamBatches | None, torch.utils.data.DataLoader | None]:
        """(stream, loader): a stream is read through StreamBatches and not prepared (accelerate would shard it
        again, across processes that already read disjoint parts), so the loader is None for it."""
        args = self.args
        reading = (self.setup.dataset, args.train_batch_size, args.dataloader_num_workers, args.seed)
        return (StreamBatches(*reading), None) if args.streaming else (None, build_dataloader(*reading))

    def _build_model(self) -> tuple[torch.nn.Module, DDPMUNet, FlatParameters]:
        """(prepared model, the U-Net itself, its parameters in one flat buffer)."""
        unet = self.setup.unet
        if self.args.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        # --channels_last: the weights take the activations' layout before DDP and the optimizer state see them.
        unet.channels_last = self.channels_last
        unet.to(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        model = self.accelerator.prepare(unet)
        raw = self.accelerator.unwrap_model(model)
        # Re-seated in one buffer once `prepare` has placed them (moving them to "cpu:0" under multi-CPU copies them):
        # the optimizer, clipping, zeroing and EMA then each run one kernel over all of them. DDP keeps the same
        # Parameter objects and copies its reduced buckets into their gradients in place.
        return model, raw, FlatParameters(raw.parameters())

    def _build_optimizer(self, loader: torch.utils.data.DataLoader | None) -> tuple[Any, Any]:
        """(prepared AdamW over the flat buffer, prepared loader)."""
        args = self.args
        optimizer = torch.optim.AdamW(
            [self.flat.param],
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
            fused=True,  # one kernel for the whole update instead of ~10 ops over the buffer
        )
        self.flat.attach_optimizer(optimizer)
        optimizer, loader = self.accelerator.prepare(optimizer, loader)
        register_flat_checkpointing(self.accelerator)
        return optimizer, loader

    def _build_compiled_forward(self) -> torch.nn.Module:
        """--dynamo_backend: a compiled wrapper (over the DDP module, as accelerate would compile it) for the training
        forward only. accelerate's own compile would put it in its model list, and `save_state` would then write
        `_orig_mod.`-prefixed weights that an uncompiled run cannot resume; sampling and evaluation at other batch
        sizes would recompile it. So checkpoints, EMA, evaluation and sampling use the plain module."""
        dynamo = dynamo_kwargs(self.args)
        return torch.compile(self.model, **dynamo) if dynamo is not None else self.model

    def _count_steps(self) -> tuple[int | None, int | None, int]:
        """(optimizer steps per epoch, epochs, steps of the run); a stream's length is unknown, so --max_train_steps
        alone sets its run (args.py requires it) and the first two are None."""
        args = self.args
        if self.stream is not None:
            return None, None, args.max_train_steps
        steps_per_epoch = math.ceil(len(self.loader) / args.gradient_accumulation_steps)
        max_steps = args.max_train_steps or args.num_epochs * steps_per_epoch
        return steps_per_epoch, math.ceil(max_steps / steps_per_epoch), max_steps

    def _build_lr_scheduler(self) -> Any:
        """Not prepared by accelerate, which would step it once per process: the schedule counts optimizer steps."""
        args = self.args
        lr_scheduler = get_scheduler(
            args.lr_scheduler,
            optimizer=self.optimizer.optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=self.max_steps,
        )
        self.accelerator.register_for_checkpointing(lr_scheduler)
        return lr_scheduler

    def _build_ema(self) -> tuple[EMAModel | None, FlatEMA | None]:
        """(EMA of the weights, its one-kernel update over the flat buffer), or (None, None) without --use_ema."""
        args = self.args
        if not args.use_ema:
            return None, None
        ema = EMAModel(
            self.flat.params,
            decay=args.ema_max_decay,
            use_ema_warmup=True,
            inv_gamma=args.ema_inv_gamma,
            power=args.ema_power,
            foreach=True,
            model_cls=DDPMUNet,
            model_config=self.raw.config,
        )
        ema.to(self.device)
        register_ema_checkpointing(self.accelerator, ema)
        return ema, FlatEMA(ema, self.flat)

    def _resume(self) -> int:
        """Load the checkpoint to resume from, if any, and seed the noise; returns the step to continue from."""
        setup, accelerator = self.setup, self.accelerator
        if setup.checkpoint is None:
            # Each process draws its own noise from here on (seed + rank); a resumed run gets its RNG from load_state.
            set_seed(self.args.seed, device_specific=True)
            return 0
        logger.info("resuming from %s (step %d)", setup.checkpoint, setup.resume_step)
        accelerator.load_state(str(setup.checkpoint))
        if self.ema is not None:
            self.ema.to(self.device)
            self.flat_ema.rebind()  # loading replaced the shadow tensors
        if self.stream is not None:  # each process continues where it was in its own part of the stream
            self.stream.load_state_dict(read_stream_state(setup.checkpoint, accelerator.process_index))
        return setup.resume_step

    def _build_fixed_batch(self) -> dict[str, torch.Tensor] | None:
        """The batch whose loss every evaluation reports (main process, with --eval_steps), else None."""
        if not (self.accelerator.is_main_process and self.args.eval_steps):
            return None
        return eval_batch(self.setup.dataset, self.diffusion.num_timesteps, self.args.seed)

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

    def _eval_models(self) -> dict[str, DDPMUNet]:
        """The weights to sample and evaluate, the saved ones first: {"ema", "raw"} with EMA, else {"raw"}."""
        return {"raw": self.raw} if self.ema is None else {"ema": self.export_unet(), "raw": self.raw}

    def metrics(self) -> TrainingMetrics:
        """The run's measurements so far, as the card and training_metrics.json report them."""
        return self.progress.metrics(self.global_step, sum(q.numel() for q in self.raw.parameters()))

    # --- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to the last step, evaluating, checkpointing and sampling on the way, then save, check and push
        (the shape of improved-diffusion's `TrainLoop.run_loop`: while not done, a batch, a step, log, eval, save)."""
        args = self.args
        self._start()
        batches = self._batches()
        while self.global_step < self.max_steps:
            step_loss = self._run_step(batches)
            if step_loss is None:  # the data ran out
                break
            self._log_step(step_loss)
            # Evaluation first (every process: it gathers), so that a checkpoint of this step includes it.
            if self._due(args.eval_steps):
                self._side_work(self.evaluate)
            if self.nonfinite_steps == 0 and self._due(args.checkpointing_steps):
                self._side_work(self.save, True)
            if self.accelerator.is_main_process and self._due(args.save_images_steps):
                self._side_work(self.log_grids)
        self.progress_bar.close()
        self._finish()
        return TrainResult(self.output_dir, self.repo_id, self.metrics())

    def _start(self) -> None:
        """Before the first step: the Hub repo, the trackers, the evaluation of the starting weights, the bar."""
        args, accelerator = self.args, self.accelerator
        if accelerator.is_main_process and args.push_to_hub:
            self.repo_id = create_hub_repo(self.output_dir, args.hub_model_id, args.hub_private_repo)
        if args.logger != "none":
            accelerator.init_trackers("hf_ddpm", config=tracker_config(args))
        self.progress.restart_clock()
        if args.eval_steps and self.global_step == 0:
            self._side_work(self.evaluate)
        self.progress_bar = progress_bar(
            total=self.max_steps,
            initial=self.global_step,
            disable=not accelerator.is_main_process,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        self.model.train()

    def _batches(self) -> Iterator[dict[str, Any]]:
        """The batches to train on, epoch after epoch from the one a resumed run stopped in (`self.epoch`); a
        stream's without end (the loop stops at the last step)."""
        if self.stream is not None:
            epochs: Iterable[int] = self.stream.epochs()
        else:
            epochs = range(self.global_step // self.steps_per_epoch, self.num_epochs)
        for epoch in epochs:
            self.epoch = epoch
            yield from self._epoch_batches(epoch)

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

    def _run_step(self, batches: Iterator[dict[str, Any]]) -> float | None:
        """One optimizer step: batches until accelerate closes the accumulation window, then the LR schedule and (on
        a finite loss) the EMA. Returns the step's loss, or None when the data ran out."""
        window_losses = []
        self.train_step.window_finite = True
        for batch in batches:
            if self.progress.skipped.update(batch):
                logger.warning("%d unreadable images skipped so far", self.progress.skipped.count)
            loss, images = self.train_step(batch, self.model, self.train_model)
            window_losses.append(loss)
            self.progress.images_seen += images
            if self.accelerator.sync_gradients:
                break
        else:
            return None
        self.global_step += 1
        self.lr_scheduler.step()
        step_loss = float(torch.stack(window_losses).mean())
        if self.train_step.window_finite:
            self.nonfinite_steps = 0
            if self.flat_ema is not None:
                self.flat_ema.step()
            self.progress.losses.append(step_loss)
        else:
            self._skip_nonfinite_step(step_loss)
        return step_loss

    def _skip_nonfinite_step(self, step_loss: float) -> None:
        """Count a step whose update was skipped for a NaN/inf loss; raise TrainingDiverged at MAX_NONFINITE_STEPS."""
        self.nonfinite_steps += 1
        logger.warning(
            "step %d: loss is %s; update skipped (%d/%d in a row)",
            self.global_step, step_loss, self.nonfinite_steps, MAX_NONFINITE_STEPS,
        )  # fmt: skip
        if self.nonfinite_steps >= MAX_NONFINITE_STEPS:
            self.progress_bar.close()
            raise TrainingDiverged(
                f"the loss was NaN/inf for {MAX_NONFINITE_STEPS} optimizer steps in a row (up to step "
                f"{self.global_step}); training stopped. The checkpoints in {self.output_dir} are "
                "untouched (none is written while the loss is not finite): lower --learning_rate or "
                "--max_grad_norm, or use --mixed_precision no, and resume from the last one."
            )

    def _log_step(self, step_loss: float) -> None:
        """The step's loss, learning rate and epoch to the tracker, and the mean loss to the progress bar."""
        lr = self.lr_scheduler.get_last_lr()[0]
        self.accelerator.log(
            {"train/loss": step_loss, "train/lr": lr, "train/epoch": self.epoch}, step=self.global_step
        )
        self.progress_bar.update(1)
        mean_loss = self.progress.mean_loss()
        if mean_loss is not None:
            self.progress_bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def _due(self, every: int | None) -> bool:
        """Whether periodic work done `every` optimizer steps (0 or None: never) falls on this step."""
        return bool(every) and self.global_step % every == 0

    def _finish(self) -> None:
        """After the last step: the last grids and evaluation, the final save (and push), then the processes'
        agreement check and accelerate's end of training."""
        args, accelerator = self.args, self.accelerator
        accelerator.wait_for_everyone()
        if accelerator.is_main_process and self.grid_step != self.global_step:
            self._side_work(self.log_grids)
        if args.eval_steps and self.last_eval_step != self.global_step:
            self._side_work(self.evaluate)
        if self.setup.calibration_images is not None:
            self._side_work(self.calibrate_variance)
        # The last state is always checkpointed (when checkpointing is on), so a finished run can be extended.
        self._side_work(self.save, bool(args.checkpointing_steps) and self.saved_step != self.global_step, True)
        tensors = list(self.raw.parameters()) + (self.ema.shadow_params if self.ema is not None else [])
        check_processes_agree(accelerator, tensors, "weights" if self.ema is None else "weights and EMA")
        if self.progress.skipped.count:
            count = self.progress.skipped.count
            logger.warning("%d unreadable images were skipped in total (each time one was drawn)", count)
        accelerator.wait_for_everyone()
        if accelerator.num_processes > 1:
            self._side_work(self._free_ddp_wrapper)
        accelerator.end_training()

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
            self.progress.overhead += time.perf_counter() - start

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
                progress=self.progress.as_dict(),
                stream_state=self.stream.state_dict() if self.stream is not None else None,
            )
            self.saved_step = self.global_step
        if not self.accelerator.is_main_process:
            return
        metrics = self.metrics()
        card_id = self.repo_id or os.fspath(self.output_dir)
        card = render_model_card(card_id, self.args, metrics, self.latest_grid, self.accelerator.num_processes)
        pipeline = HFDDPMPipeline(unet=self.export_unet(), scheduler=self.noise_scheduler)
        write_pipeline_folder(self.output_dir, pipeline, metrics, card)
        if self.repo_id is not None:
            push_step(self.output_dir, self.repo_id, self.global_step, final)

    def log_grids(self) -> None:
        """Sample grids of the EMA and the raw model into samples/ and the tracker (main process)."""
        args = self.args
        models = self._eval_models()
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

    def evaluate(self) -> None:
        """One evaluation; every process calls it. `--eval_metrics` of the saved (EMA) weights, each process on its
        share (`periodic_eval`); on the main process also the loss of the raw (and EMA) weights on the fixed batch.
        The main process logs it all, with the seconds spent, as eval/* (tracker, console, eval_history)."""
        started = time.perf_counter()
        self.last_eval_step = self.global_step
        models = self._eval_models()
        loss_terms = self.train_step.loss_terms
        logs = evaluate_models(models, self.setup.evaluator, self.fixed_batch, loss_terms, self.noise_scheduler)
        if not self.accelerator.is_main_process:
            return
        logs["eval/seconds"] = round(time.perf_counter() - started, 2)
        self.progress.eval_loss = logs.get(f"eval/loss_{next(iter(models))}", self.progress.eval_loss)
        self.progress.eval_history.append({"step": self.global_step, **logs})
        self.accelerator.log(logs, step=self.global_step)
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in logs.items() if k != "eval/seconds")
        logger.info("evaluation at step %d took %.1f s: %s", self.global_step, logs["eval/seconds"], shown)

    def calibrate_variance(self) -> None:
        """--calibrate_variance (main process): Γ_t of the saved weights into the scheduler config that the final
        save writes, so the saved pipeline can sample with the analytic variance."""
        pipeline = HFDDPMPipeline(unet=self.export_unet(), scheduler=self.noise_scheduler)
        estimate = calibrate_pipeline(pipeline, self.setup.calibration_images.to(self.device), seed=self.args.seed)
        self.noise_scheduler = pipeline.scheduler
        logger.info("analytic variance calibrated: %s", estimate.summary())

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
    accelerator = build_accelerator(args)
    try:
        setup = setup_run(args, accelerator)
    except (ValueError, OSError, ImportError) as err:  # OSError covers FileNotFoundError and ConnectionError
        raise TrainingInputError(str(err)) from err
    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        clean_interrupted_writes(output_dir)
        remove_partial_checkpoints(output_dir)
        write_run_config(output_dir, {**vars(args), "num_processes": accelerator.num_processes})
    accelerator.wait_for_everyone()
    return _Trainer(args, accelerator, setup).run()
