"""What the hf-ddpm Space does, without its UI: load the model, check inputs, stream samples, show the forward
process and plot noise schedules. `app.py` lays these out with Gradio.

Every formula comes from `hf_ddpm` (the schedules, q(x_t | x_0), SNR, the posterior variance); this module only
moves tensors into pictures.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # a Space has no display
# Imported once, now, in the main thread: Gradio calls matplotlib.use() around every event, which switches pyplot's
# backend if pyplot is in sys.modules; a first import of pyplot by a request thread (Gradio's Plot does one) races
# that, and the other event fails with "partially initialized module 'matplotlib.pyplot'".
import matplotlib.pyplot  # noqa: F401
import numpy as np
import PIL.Image
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor
from matplotlib.figure import Figure

from hf_ddpm import DDIMPosteriorScheduler, DDPMPosteriorScheduler, HFDDPMPipeline, make_betas
from hf_ddpm import images as pictures
from hf_ddpm.diffusion import GaussianDiffusion, q_sample, snr
from hf_ddpm.schedulers.base import TIMESTEP_SPACINGS

logger = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
BUNDLED_MODEL = HERE / "model"
MODEL_ENV = "HF_DDPM_MODEL"

DDPM, DDIM, LANGEVIN = "DDPM ancestral", "DDIM", "DDPM + Langevin corrector"
DPM_SOLVER, UNIPC = "DPM-Solver++ (2M)", "UniPC"
SAMPLERS = (DDPM, DDIM, LANGEVIN, DPM_SOLVER, UNIPC)
# diffusers' fast solvers, swapped in as a user would: `XScheduler.from_config(pipe.scheduler.config)`.
DIFFUSERS_SOLVERS: dict[str, type[SchedulerMixin]] = {
    DPM_SOLVER: DPMSolverMultistepScheduler,
    UNIPC: UniPCMultistepScheduler,
}
SPACINGS = TIMESTEP_SPACINGS
MAX_IMAGES = 16
MAX_SEED = 2**32 - 1
MAX_CORRECTOR_STEPS = 5
# Names of the generate inputs, in the order of `check_generate_inputs`' arguments (and of the UI's inputs).
GENERATE_INPUTS = ("sampler", "steps", "eta", "spacing", "seed", "num_images", "corrector_steps")
TILE = 128  # samples are shown at least this wide, upscaled with nearest neighbours (a 16x16 digit is tiny)
GRID_PAD = 2
MAX_PLOT_TIMESTEPS = 4000

# The schedules of the Schedules tab: make_betas' defaults (β from 1e-4 to 0.02 where a range applies).
SCHEDULE_CURVES: dict[str, dict[str, Any]] = {
    "linear": dict(beta_schedule="linear"),
    "cosine": dict(beta_schedule="cosine"),
    "sigmoid": dict(beta_schedule="sigmoid"),
    "scaled_linear": dict(beta_schedule="scaled_linear"),
    "quadratic": dict(beta_schedule="quadratic"),
    "linear, zero terminal SNR": dict(beta_schedule="linear", rescale_betas_zero_snr=True),
}


def configure_torch(threads: int | None = None) -> None:
    """Use `threads` intra-op threads (env HF_DDPM_TORCH_THREADS, default 1).

    The model is tiny and the server runs other requests in parallel threads: more intra-op threads than free cores
    leave OpenMP threads spin-waiting at every barrier for a descheduled partner, which makes each U-Net call many
    times slower than one thread does, while one thread per request already keeps the cores busy.
    """
    torch.set_num_threads(threads or int(os.environ.get("HF_DDPM_TORCH_THREADS", "1")))


# --- the model ---------------------------------------------------------------------------------------------------


def load_pipeline(source: str | os.PathLike | None = None) -> tuple[HFDDPMPipeline, str]:
    """Load the pipeline to serve: `source` (a Hub repo id or a local folder), else the bundled digits model.

    `source` may be an hf_ddpm pipeline or a diffusers DDPMPipeline/DDIMPipeline such as `google/ddpm-cifar10-32`
    (converted with `HFDDPMPipeline.from_diffusers`). Returns `(pipeline, notice)`; `notice` is Markdown saying why
    `source` could not be loaded (the bundled model is served instead), or "" when nothing went wrong.
    """
    from hf_ddpm.diffusers_repos import is_diffusers_ddpm_repo

    notice = ""
    if source:
        try:
            load = HFDDPMPipeline.from_diffusers if is_diffusers_ddpm_repo(source) else HFDDPMPipeline.from_pretrained
            return _ready(load(source)), notice
        except Exception as err:  # noqa: BLE001 - any failure falls back; the reason is shown, the traceback logged
            logger.warning("could not load %s; serving the bundled model", source, exc_info=True)
            notice = (
                f"⚠️ **Could not load the model `{source}`**: {_why_not_loaded(source, err)} "
                "Serving the bundled digits model instead."
            )
    return _ready(HFDDPMPipeline.from_pretrained(BUNDLED_MODEL)), notice


def _why_not_loaded(source: str | os.PathLike, err: BaseException) -> str:
    """A plain sentence for the usual failures; diffusers' own messages are long and name its internals."""
    from huggingface_hub.errors import OfflineModeIsEnabled, RepositoryNotFoundError

    causes, cause = [], err
    while cause is not None and len(causes) < 20:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    network = {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "ProxyError"}
    if any(isinstance(c, OfflineModeIsEnabled) for c in causes):
        return "offline mode is on (HF_HUB_OFFLINE), and the model is not in the local cache."
    if any(isinstance(c, (ConnectionError, TimeoutError)) or type(c).__name__ in network for c in causes):
        return "the Hub could not be reached, and the model is not in the local cache."
    if any(isinstance(c, RepositoryNotFoundError) for c in causes):
        return "there is no such model repository on the Hub (or it is private and no token allows it)."
    text = str(source)
    looks_like_path = text.startswith((".", "/", "~")) or text.count("/") > 1  # a repo id is `name` or `org/name`
    if looks_like_path and not Path(text).expanduser().is_dir():
        return "there is no such folder."
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line[:240]}"


def _ready(pipe: HFDDPMPipeline) -> HFDDPMPipeline:
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def image_shape(pipe: HFDDPMPipeline) -> tuple[int, int, int]:
    """(C, H, W) of the images the pipeline's U-Net makes."""
    size = pipe.unet.config.sample_size
    height, width = size if isinstance(size, (list, tuple)) else (size, size)
    return pipe.unet.config.in_channels, height, width


def training_process(pipe: HFDDPMPipeline) -> GaussianDiffusion:
    """The forward process the model was trained with, built from its scheduler config (ours or diffusers')."""
    return DDPMPosteriorScheduler.from_config(pipe.scheduler.config).diffusion


def describe_model(pipe: HFDDPMPipeline, source: str | os.PathLike | None) -> str:
    """One Markdown line naming the served model, its image size and its noise schedule."""
    channels, height, width = image_shape(pipe)
    config = pipe.scheduler.config
    name = f"`{source}`" if source else "the bundled digits DDPM"
    zero_snr = ", zero terminal SNR" if config.get("rescale_betas_zero_snr") else ""
    return (
        f"Model: {name} · {height}×{width}, {channels} channel{'s' * (channels != 1)} · "
        f"T = {config.num_train_timesteps}, {config.get('beta_schedule', 'linear')} β{zero_snr} · "
        f"predicts {config.get('prediction_type', 'epsilon')}"
    )


def make_scheduler(config: Any, sampler: str, spacing: str) -> SchedulerMixin:
    """A fresh scheduler of the sampler's kind over the model's schedule (one per request: they hold state)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"Unknown sampler {sampler!r}; allowed: {', '.join(SAMPLERS)}.")
    cls = DIFFUSERS_SOLVERS.get(sampler) or (DDIMPosteriorScheduler if sampler == DDIM else DDPMPosteriorScheduler)
    return cls.from_config(config, timestep_spacing=spacing)


# --- input checks ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerateSettings:
    """Checked inputs of one generate request."""

    sampler: str
    steps: int
    eta: float
    spacing: str
    seed: int
    num_images: int
    corrector_steps: int


def _whole(value: Any) -> int | None:
    """`value` as an int if it is a whole number (or a string of one), else None; booleans are not numbers."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def _real(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _in_range(value: int | float | None, low: float, high: float) -> bool:
    return value is not None and low <= value <= high


def check_generate_inputs(
    sampler: Any,
    steps: Any,
    eta: Any,
    spacing: Any,
    seed: Any,
    num_images: Any,
    corrector_steps: Any,
    num_train_timesteps: int,
) -> tuple[GenerateSettings | None, dict[str, str]]:
    """Check raw generate inputs (as a browser or an API client sends them).

    Returns `(settings, {})` when all are valid, else `(None, errors)` with a message per bad input name.
    """
    T = num_train_timesteps
    values = dict(
        steps=_whole(steps),
        eta=_real(eta),
        seed=_whole(seed),
        num_images=_whole(num_images),
        corrector_steps=_whole(corrector_steps),
    )
    errors: dict[str, str] = {}
    if sampler not in SAMPLERS:
        errors["sampler"] = f"Sampler must be one of: {', '.join(SAMPLERS)}; got {sampler!r}."
    if not _in_range(values["steps"], 1, T):
        errors["steps"] = f"Steps must be a whole number from 1 to {T} (the model's T); got {steps!r}."
    if not _in_range(values["eta"], 0, 1):
        errors["eta"] = f"η must be a number from 0 (deterministic DDIM) to 1 (DDPM-like); got {eta!r}."
    if spacing not in SPACINGS:
        errors["spacing"] = f"Timestep spacing must be one of: {', '.join(SPACINGS)}; got {spacing!r}."
    if not _in_range(values["seed"], 0, MAX_SEED):
        errors["seed"] = f"Seed must be a whole number from 0 to {MAX_SEED}; got {seed!r}."
    if not _in_range(values["num_images"], 1, MAX_IMAGES):
        errors["num_images"] = f"Number of images must be a whole number from 1 to {MAX_IMAGES}; got {num_images!r}."
    if not _in_range(values["corrector_steps"], 1, MAX_CORRECTOR_STEPS):
        errors["corrector_steps"] = (
            f"Corrector steps must be a whole number from 1 to {MAX_CORRECTOR_STEPS}; got {corrector_steps!r}."
        )
    if errors:
        return None, errors
    return GenerateSettings(sampler=sampler, spacing=spacing, **values), {}


def check_forward_inputs(index: Any, t: Any, seed: Any, num_digits: int, num_train_timesteps: int) -> list[str]:
    """Messages for bad Forward-process inputs (digit index, t, noise seed); empty when all are valid."""
    errors = []
    if not _in_range(_whole(index), 0, num_digits - 1):
        errors.append(f"The digit index must be a whole number from 0 to {num_digits - 1}; got {index!r}.")
    if not _in_range(_whole(t), 0, num_train_timesteps - 1):
        errors.append(f"t must be a whole number from 0 to {num_train_timesteps - 1}; got {t!r}.")
    if not _in_range(_whole(seed), 0, MAX_SEED):
        errors.append(f"The noise seed must be a whole number from 0 to {MAX_SEED}; got {seed!r}.")
    return errors


def check_schedule_inputs(names: Any, num_train_timesteps: Any) -> list[str]:
    """Messages for bad Schedules inputs (schedule names, T); empty when all are valid."""
    errors = []
    if not isinstance(names, (list, tuple)) or not names or any(name not in SCHEDULE_CURVES for name in names):
        errors.append(f"Pick one or more schedules of: {', '.join(SCHEDULE_CURVES)}; got {names!r}.")
    if not _in_range(_whole(num_train_timesteps), 2, MAX_PLOT_TIMESTEPS):
        errors.append(f"T must be a whole number from 2 to {MAX_PLOT_TIMESTEPS}; got {num_train_timesteps!r}.")
    return errors


# --- sampling, streamed ------------------------------------------------------------------------------------------


@dataclass
class SampleUpdate:
    """The state after `step` of `total` denoising steps (step 0: the initial noise x_T).

    sample: the current x_t, [N, C, H, W] on the CPU; pred_x0: the model's x̂_0 at this step (None at step 0).
    """

    step: int
    total: int
    timestep: int | None
    sample: torch.Tensor
    pred_x0: torch.Tensor | None


@dataclass
class SampleResult:
    """The finished images, [N, H, W, C] float in [0, 1] (the pipeline's "np" output), and the last x̂_0."""

    images: np.ndarray
    pred_x0: torch.Tensor | None


class _Stopped(Exception):
    """Raised inside the sampler thread when the consumer went away."""


class _Newest:
    """Holds only the newest update: sampling never waits for the UI, and the UI skips what it could not show."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Any = None
        self._closed = False

    def put(self, item: Any) -> None:
        with self._cond:
            self._item = item
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def get(self) -> Any:
        """The newest item not yet taken; None once closed and drained."""
        with self._cond:
            while self._item is None and not self._closed:
                self._cond.wait()
            item, self._item = self._item, None
            return item


def sample_stream(pipe: HFDDPMPipeline, settings: GenerateSettings) -> Iterator[SampleUpdate | SampleResult]:
    """Sample with `pipe`, yielding x_T first, then the newest step whenever the consumer asks, then the result.

    The pipeline runs in a thread and hands x_t and x̂_0 to its step-end callback; closing this generator stops it
    at the next step. The images equal `pipe(batch_size, num_inference_steps,
    generator=torch.Generator().manual_seed(seed), ...)` with the same scheduler: x_T is drawn the way the pipeline
    draws it.
    """
    scheduler = make_scheduler(pipe.scheduler.config, settings.sampler, settings.spacing)
    runner = HFDDPMPipeline(unet=pipe.unet, scheduler=scheduler)
    runner.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(settings.seed)
    shape = (settings.num_images, *image_shape(pipe))
    latents = randn_tensor(shape, generator=generator, device=pipe.unet.device, dtype=pipe.unet.dtype)
    scheduler.set_timesteps(settings.steps)
    total = len(scheduler.timesteps)  # DPM-Solver's clipped λ range can leave fewer steps than asked
    yield SampleUpdate(0, total, None, latents.float().cpu(), None)

    newest, stop, outcome, pred_x0 = _Newest(), threading.Event(), {}, {}

    def on_step_end(_pipe: HFDDPMPipeline, i: int, t: torch.Tensor, tensors: dict) -> dict:
        if stop.is_set():
            raise _Stopped
        x0 = tensors["pred_original_sample"]
        pred_x0["x0"] = x0 = None if x0 is None else x0.float().cpu()
        newest.put(SampleUpdate(i + 1, total, int(t), tensors["latents"].float().cpu(), x0))
        return {}

    def run() -> None:
        try:
            outcome["images"] = runner(
                batch_size=settings.num_images,
                num_inference_steps=settings.steps,
                generator=generator,
                eta=settings.eta if settings.sampler == DDIM else 0.0,
                output_type="np",
                latents=latents,
                corrector_steps=settings.corrector_steps if settings.sampler == LANGEVIN else 0,
                callback_on_step_end=on_step_end,
                callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"],
            ).images
        except BaseException as err:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            outcome["error"] = err
        finally:
            newest.close()

    worker = threading.Thread(target=run, name="hf-ddpm-sampler", daemon=True)
    worker.start()
    try:
        while (update := newest.get()) is not None:
            yield update
        worker.join()
        if "error" in outcome:
            raise outcome["error"]
        yield SampleResult(outcome["images"], pred_x0.get("x0"))
    finally:
        stop.set()
        worker.join()


# --- pictures ----------------------------------------------------------------------------------------------------


def to_uint8(x: torch.Tensor | np.ndarray, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Images [N, C, H, W] (tensor) or [N, H, W, C] (array) in `value_range` -> uint8 [N, H, W, C], clipped."""
    if torch.is_tensor(x):
        x = x.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    low, high = value_range
    return np.clip(np.rint((np.asarray(x, dtype=np.float64) - low) / (high - low) * 255), 0, 255).astype(np.uint8)


def upscale(image: np.ndarray, min_size: int = TILE) -> PIL.Image.Image:
    """uint8 [H, W, C] -> a PIL image enlarged by a whole factor (nearest) so that its height is >= min_size."""
    return pictures.upscale(image, min_size)


def grid_size(num_images: int, height: int, width: int) -> tuple[int, int]:
    """(width, height) in pixels of `make_grid`'s picture of `num_images` images of height x width."""
    return pictures.grid_size(num_images, height, width, TILE, GRID_PAD, margin=GRID_PAD)


def make_grid(samples: np.ndarray) -> PIL.Image.Image:
    """uint8 [N, H, W, C] -> one upscaled picture, ⌈√N⌉ columns, white gaps of GRID_PAD pixels."""
    return pictures.image_grid(samples, min_tile=TILE, gap=GRID_PAD, fill=255, margin=GRID_PAD)


# --- the forward process -----------------------------------------------------------------------------------------


def load_digits() -> list[tuple[PIL.Image.Image, int]]:
    """The built-in digits (hf_ddpm.data.digits_dataset) as (8x8 PIL image, label) pairs."""
    from hf_ddpm.data import digits_dataset  # needs `datasets` and scikit-learn: only the Forward tab uses it

    ds = digits_dataset()
    return list(zip(ds["image"], ds["label"]))


def prepare_image(image: PIL.Image.Image, pipe: HFDDPMPipeline) -> torch.Tensor:
    """Any PIL image -> x_0 as the model sees it: [1, C, H, W] in [-1, 1] (the training transform, center crop)."""
    from hf_ddpm.data import image_transform

    channels, height, _ = image_shape(pipe)
    return image_transform(height, center_crop=True, channels=channels)(image).unsqueeze(0)


@dataclass
class ForwardView:
    """x_0, ε and x_t (uint8 [H, W, C]) and the schedule's values at t."""

    x0: np.ndarray
    noise: np.ndarray
    x_t: np.ndarray
    t: int
    beta: float
    alpha_bar: float
    snr: float


def forward_process(diffusion: GaussianDiffusion, x0: torch.Tensor, t: int, seed: int) -> ForwardView:
    """x_t = √ᾱ_t·x_0 + √(1-ᾱ_t)·ε for one image x0 [1, C, H, W], with ε drawn from `seed` (the same ε for every t)."""
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    alpha_bar = float(diffusion.alphas_cumprod[t])
    x_t = q_sample(x0.double(), noise.double(), alpha_bar)
    return ForwardView(
        to_uint8(x0)[0], to_uint8(noise)[0], to_uint8(x_t)[0], t, float(diffusion.betas[t]), alpha_bar, snr(alpha_bar)
    )


def forward_markdown(view: ForwardView, num_train_timesteps: int) -> str:
    """The formula of q(x_t | x_0) and the values of β_t, ᾱ_t and SNR(t) at the view's t."""
    log_snr = math.log(view.snr) if view.snr > 0 else -math.inf
    return (
        "$$x_t = \\sqrt{\\bar\\alpha_t}\\,x_0 + \\sqrt{1-\\bar\\alpha_t}\\,\\varepsilon, \\qquad "
        "\\varepsilon \\sim \\mathcal{N}(0, I)$$\n\n"
        f"| t | β_t | ᾱ_t | √ᾱ_t (signal) | √(1−ᾱ_t) (noise) | SNR(t) = ᾱ_t/(1−ᾱ_t) | log SNR(t) |\n"
        "|---|---|---|---|---|---|---|\n"
        f"| {view.t} / {num_train_timesteps - 1} | {view.beta:.4g} | {view.alpha_bar:.4g} | "
        f"{math.sqrt(view.alpha_bar):.4f} | {math.sqrt(1 - view.alpha_bar):.4f} | {view.snr:.4g} | {log_snr:.3f} |\n\n"
        "Images are shown clipped to [-1, 1]; ε is fixed by the noise seed, so only t changes x_t."
    )


# --- schedules ---------------------------------------------------------------------------------------------------


def schedule_processes(names: Sequence[str], num_train_timesteps: int) -> dict[str, GaussianDiffusion]:
    """The forward process of each named entry of SCHEDULE_CURVES over T steps."""
    return {
        name: GaussianDiffusion(make_betas(num_train_timesteps=num_train_timesteps, **SCHEDULE_CURVES[name]))
        for name in names
    }


def schedule_figure(names: Sequence[str], num_train_timesteps: int) -> Figure:
    """β_t, ᾱ_t, log SNR(t) and β̃_t against β_t for the named schedules, one curve each, on a 2x2 figure."""
    processes = schedule_processes(names, num_train_timesteps)
    figure = Figure(figsize=(11, 7.5), layout="constrained")
    (ax_beta, ax_abar), (ax_snr, ax_post) = figure.subplots(2, 2)
    t = np.arange(num_train_timesteps)
    for name, process in processes.items():
        # Dashed for the rescaled schedule, which otherwise hides the schedule it rescales.
        style = dict(label=name, linestyle="--" if SCHEDULE_CURVES[name].get("rescale_betas_zero_snr") else "-")
        with np.errstate(divide="ignore"):  # ᾱ = 0 at the end of a zero-terminal-SNR schedule: log SNR = -inf
            log_snr = np.log(snr(process.alphas_cumprod).numpy())
        ax_beta.plot(t, process.betas.numpy(), **style)
        ax_abar.plot(t, process.alphas_cumprod.numpy(), **style)
        ax_snr.plot(t, log_snr, **style)
        # β̃_0 = 0 (x_0 is known given x_1) and a log axis cannot show t = 0: from t = 1 on.
        ax_post.plot(t[1:], (process.posterior_variance / process.betas).numpy()[1:], **style)
    ax_beta.set(title="β_t", xlabel="t", yscale="log")
    ax_abar.set(title="ᾱ_t = ∏ (1 − β_s)", xlabel="t", ylim=(-0.02, 1.02))
    ax_snr.set(title="log SNR(t) = log ᾱ_t / (1 − ᾱ_t)", xlabel="t")
    ax_post.set(
        title="posterior variance against β_t: β̃_t / β_t", xlabel="t (log scale)", xscale="log", ylim=(-0.02, 1.02)
    )
    for ax in (ax_beta, ax_abar, ax_snr, ax_post):
        ax.grid(alpha=0.3)
    ax_abar.legend(fontsize="small")
    return figure


def schedule_markdown(names: Sequence[str], num_train_timesteps: int) -> str:
    """A table of each schedule's first and last β and where it ends (ᾱ and log SNR at t = T-1)."""
    processes = schedule_processes(names, num_train_timesteps)
    rows = ["| schedule | β_0 | β_{T-1} | ᾱ_{T-1} | log SNR(T-1) |", "|---|---|---|---|---|"]
    for name, process in processes.items():
        end = float(process.alphas_cumprod[-1])
        log_snr = math.log(snr(end)) if end > 0 else -math.inf
        rows.append(
            f"| {name} | {float(process.betas[0]):.3g} | {float(process.betas[-1]):.3g} | {end:.3g} | {log_snr:.2f} |"
        )
    notes = [
        "All schedules use `make_betas` defaults (β from 1e-4 to 0.02 where a range applies). A schedule whose "
        "ᾱ_{T-1} is far from 0 never turns the image into pure noise, so sampling from N(0, I) starts off the "
        "training distribution; the zero-terminal-SNR rescale (Lin et al. 2023) makes ᾱ_{T-1} exactly 0."
    ]
    listed = list(processes.items())
    for k, (name, process) in enumerate(listed):
        same = [other for other, p in listed[k + 1 :] if torch.allclose(p.betas, process.betas, rtol=1e-9, atol=0)]
        if same:
            notes.append(f"{' and '.join([name, *same])} are the same schedule here: their curves lie on each other.")
    return "\n".join(rows) + "\n\n" + " ".join(notes)


def timed(start: float) -> str:
    """Seconds since `start` (a `time.perf_counter()` value), formatted."""
    return f"{time.perf_counter() - start:.1f} s"
