"""HFDDPMPipeline: unconditional sampling with a DDPM U-Net and any DDPM/DDIM scheduler, plus DDIM inversion."""

from __future__ import annotations

import inspect
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DDPMParallelScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from .compilation import check_compile, compile_kwargs
from .diffusers_repos import load_diffusers_ddpm_parts
from .diffusion import LEARNED_VARIANCE_TYPES, split_model_output
from .progress import pipeline_progress_bar
from .registration import LIBRARY_NAME
from .schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler
from .validation import check_int

OUTPUT_TYPES = ("pil", "np", "pt")
# Schedulers whose step reads a learned variance from the second half of the model output; every other one (DDIM,
# the ODE/SDE solvers, DPMSolver's fixed `[:, :3]` slice) gets the ε / x_0 / v half only.
_READS_LEARNED_VARIANCE = (DDPMPosteriorScheduler, DDPMScheduler, DDPMParallelScheduler)


@dataclass
class TrajectoryStep(BaseOutput):
    """One recorded denoising step: the timestep, x_t before the step and the model's x̂_0 (CPU tensors).

    `sample` is the latent as the scheduler holds it: x_t for DDPM/DDIM and the DPM-Solver family, x_t·√(σ² + 1) for
    the σ-space schedulers (Euler, Heun, LMS). `timestep` is an int, or a float for schedulers with fractional ones.
    """

    timestep: int | float
    sample: torch.Tensor
    pred_original_sample: torch.Tensor | None


@dataclass
class HFDDPMPipelineOutput(BaseOutput):
    """Output of `HFDDPMPipeline`.

    Args:
        images: PIL images, a numpy array [N, H, W, C] in [0, 1], or a tensor [N, C, H, W] in [0, 1].
        trajectory: the recorded steps when `return_trajectory=True`, else None.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    trajectory: list[TrajectoryStep] | None = None


def _downsampling_factor(unet: torch.nn.Module) -> int:
    config = unet.config
    levels = config.get("channel_mult") or config.get("block_out_channels") or (1,)
    return 2 ** (len(levels) - 1)


class HFDDPMPipeline(DiffusionPipeline):
    """Unconditional image generation with a DDPM U-Net (ours or diffusers') and a DDPM or DDIM scheduler.

    After `import hf_ddpm`, `DiffusionPipeline.from_pretrained(repo_or_folder)` returns this class: the saved
    `model_index.json` names the library `hf_ddpm` for our components (see `hf_ddpm.registration`).
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents", "pred_original_sample"]

    def __init__(self, unet: torch.nn.Module, scheduler: Any):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @classmethod
    def from_diffusers(cls, repo_id_or_folder: str | os.PathLike, **hub_kwargs: Any) -> HFDDPMPipeline:
        """Our pipeline from a diffusers `DDPMPipeline` / `DDIMPipeline` (e.g. `google/ddpm-cifar10-32`): its
        `UNet2DModel` converted to a `DDPMUNet` with the same weights, its `DDPMScheduler` / `DDIMScheduler` as our
        `DDPMPosteriorScheduler` / `DDIMPosteriorScheduler` with the same config.

        `hub_kwargs`: `revision`, `cache_dir`, `token`, `local_files_only`. Raises ValueError for a repository that is
        not such a pipeline or that cannot be converted (see `hf_ddpm.diffusers_repos`).
        """
        unet, scheduler = load_diffusers_ddpm_parts(repo_id_or_folder, **hub_kwargs)
        return cls(unet=unet, scheduler=scheduler)

    # diffusers records a third-party component as its full module path (hf_ddpm.models.unet); loading looks the
    # library up as an attribute of diffusers.pipelines, where `import hf_ddpm` registers the package itself.
    def register_modules(self, **kwargs: Any) -> None:
        super().register_modules(**kwargs)
        self._name_our_library(kwargs)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)  # also re-registers a swapped component, e.g. `pipe.scheduler = ...`
        if name in ("unet", "scheduler"):
            self._name_our_library({name: value})

    def _name_our_library(self, components: dict[str, Any]) -> None:
        for name, module in components.items():
            if module is not None and type(module).__module__.split(".")[0] == LIBRARY_NAME:
                self.register_to_config(**{name: (LIBRARY_NAME, type(module).__name__)})

    # --- helpers -------------------------------------------------------------------------------------------------------

    def _check_call(self, batch_size: int, num_inference_steps: int | None, output_type: str) -> None:
        check_int("batch_size", batch_size, 1)
        if num_inference_steps is not None:
            T = self.scheduler.config.num_train_timesteps
            check_int("num_inference_steps", num_inference_steps, 1, T, "(the scheduler's num_train_timesteps)")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"Unknown output_type {output_type!r}; allowed: {', '.join(OUTPUT_TYPES)}.")
        size, factor = self.unet.config.sample_size, _downsampling_factor(self.unet)
        sizes = size if isinstance(size, (list, tuple)) else (size, size)
        if any(s % factor for s in sizes):
            raise ValueError(
                f"sample_size {size} is not divisible by the U-Net's downsampling factor {factor}; "
                f"use a multiple of {factor}."
            )

    def _sample_shape(self, batch_size: int) -> tuple[int, ...]:
        size = self.unet.config.sample_size
        height, width = size if isinstance(size, (list, tuple)) else (size, size)
        return (batch_size, self.unet.config.in_channels, height, width)

    def _scheduler_takes(self, name: str) -> bool:
        return name in inspect.signature(self.scheduler.step).parameters

    def progress_bar(self, iterable: Any = None, total: int | None = None) -> Any:
        """diffusers' progress bar, writing one line per update when not attached to a terminal (logs stay
        readable)."""
        return pipeline_progress_bar(self, iterable, total)

    def _model_output(self, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # In the latents' dtype: under autocast the U-Net returns bf16/fp16, the scheduler's math stays in float32.
        output = self.unet(sample, t).sample.to(sample.dtype)
        channels = sample.shape[1]
        # Our DDIM splits a learned variance itself; the DDPM steps read it for learned variance types only.
        keeps_variance = isinstance(self.scheduler, DDIMPosteriorScheduler) or (
            isinstance(self.scheduler, _READS_LEARNED_VARIANCE)
            and self.scheduler.config.get("variance_type") in LEARNED_VARIANCE_TYPES
        )
        return output if keeps_variance else split_model_output(output, channels)[0]

    def _postprocess(
        self, images: torch.Tensor, output_type: str
    ) -> list[PIL.Image.Image] | np.ndarray | torch.Tensor:
        images = (images / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        array = images.float().cpu().permute(0, 2, 3, 1).numpy()
        return array if output_type == "np" else self.numpy_to_pil(array)

    # --- speed -------------------------------------------------------------------------------------------------------

    def compile_unet(
        self,
        mode: str | None = None,
        fullgraph: bool = False,
        dynamic: bool | None = None,
        backend: str = "inductor",
        options: dict[str, Any] | None = None,
    ) -> HFDDPMPipeline:
        """`torch.compile` the U-Net in place (`nn.Module.compile`); returns the pipeline.

        The U-Net keeps its class, config and state-dict keys, so `save_pretrained` writes the same files as before
        and `pipe.unet` is still a `DDPMUNet` (or `UNet2DModel`). The first call at each batch size, dtype or device
        compiles (tens of seconds); later calls run the generated kernels. Call it after `pipe.to(device)`.

        Args:
            mode: inductor's mode: None/"default", "reduce-overhead" (adds CUDA graphs: the fastest sampling on
                GPUs at small batches), "max-autotune" (tries kernel variants: slow to compile).
            fullgraph: fail on a graph break instead of falling back to Python there.
            dynamic: compile for symbolic batch sizes (True), static ones (False), or decide on a recompile (None).
            backend: a TorchDynamo backend; inductor generates code, "aot_eager" only captures graphs (debugging).
            options: inductor options (see `torch._inductor.list_options()`); not together with `mode`.

        Raises:
            CompilerUnavailable: inductor cannot build code here (no C++ compiler / Python headers on CPU, no triton
                on CUDA); the U-Net is left uncompiled.
        """
        check_compile(backend, self.unet.device)
        self.unet.compile(**compile_kwargs(backend, mode, fullgraph, dynamic, options))
        return self

    # --- sampling ------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_inference_steps: int | None = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        timesteps: Sequence[int] | None = None,
        latents: torch.Tensor | None = None,
        corrector_steps: int | None = None,
        use_clipped_model_output: bool | None = None,
        return_trajectory: bool = False,
        trajectory_every: int = 1,
        callback_on_step_end: Callable[[DiffusionPipeline, int, int, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> HFDDPMPipelineOutput | tuple:
        """Sample images.

        Args:
            batch_size: number of images.
            num_inference_steps: sampling steps (spaced by the scheduler's `timestep_spacing`); or give `timesteps`.
            generator: torch generator(s) for the initial noise and the posterior noise.
            eta: DDIM's η (0 deterministic, 1 DDPM-like); a scheduler without η warns if it is not 0.
            output_type: "pil", "np" ([N, H, W, C] in [0, 1]) or "pt" ([N, C, H, W] in [0, 1]).
            timesteps: explicit descending timesteps instead of `num_inference_steps`.
            latents: the initial noise, [N, C, H, W] (e.g. x_T from `invert`); drawn from N(0, I) when None. Like
                diffusers' pipelines, it is multiplied by the scheduler's `init_noise_sigma` (1 for DDPM/DDIM).
            corrector_steps: Langevin corrector steps per timestep (DDPM scheduler); None uses its config.
            use_clipped_model_output: passed to DDIM schedulers.
            return_trajectory: also return x_t and x̂_0 every `trajectory_every` entries of `scheduler.timesteps`
                (and at the last one).
            callback_on_step_end: `fn(pipe, i, t, tensors) -> dict` after each `scheduler.step`, which may replace
                the latents; `tensors` holds the names in `callback_on_step_end_tensor_inputs`: "latents" (x_{t-1})
                and/or "pred_original_sample" (this step's x̂_0, None if the scheduler gives none).

        Any diffusers scheduler works, e.g. `pipe.scheduler = DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config)`: the loop runs over `scheduler.timesteps` as diffusers' pipelines do, one U-Net call per
        entry (a second-order scheduler such as Heun lists each timestep twice), with `scale_model_input` before
        the U-Net; `i` counts those entries and the progress bar counts the `num_inference_steps` steps.
        """
        if timesteps is not None:
            num_inference_steps = None
        if latents is not None:
            batch_size = latents.shape[0]
        self._check_call(batch_size, num_inference_steps, output_type)
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not available; allowed: "
                f"{self._callback_tensor_inputs}."
            )
        if eta != 0 and not self._scheduler_takes("eta"):
            warnings.warn(
                f"eta={eta} is ignored: {type(self.scheduler).__name__} has no eta (use a DDIM scheduler).",
                stacklevel=2,
            )
        corrector_steps = self._corrector_steps(corrector_steps)
        self._set_timesteps(num_inference_steps, timesteps)
        # After set_timesteps: σ-space schedulers (Euler, Heun, LMS) set init_noise_sigma from their σ_max there.
        latents = self._initial_noise(batch_size, generator, latents) * self.scheduler.init_noise_sigma
        step_kwargs = self._step_kwargs(generator, eta, use_clipped_model_output)
        trajectory: list[TrajectoryStep] | None = [] if return_trajectory else None
        schedule = self.scheduler.timesteps
        last, order = len(schedule) - 1, self.scheduler.order
        # diffusers' rule: a multistep scheduler lists N steps; Heun-like ones list `order` U-Net calls per step.
        num_steps = self.scheduler.num_inference_steps or len(schedule)
        warmup = max(len(schedule) - num_steps * order, 0)
        # The U-Net gets the timesteps on its device, copied once: a CPU timestep per call would be a blocking
        # host-to-GPU copy, a host sync per step. The scheduler keeps its own (CPU) timesteps.
        unet_timesteps = torch.as_tensor(schedule).to(latents.device)
        with self.progress_bar(total=num_steps) as progress:
            for i, t in enumerate(schedule):
                for _ in range(corrector_steps):
                    latents = self.scheduler.langevin_step(
                        self._model_output(latents, unet_timesteps[i]), t, latents, generator=generator
                    )
                model_input = self.scheduler.scale_model_input(latents, t)
                output = self.scheduler.step(
                    self._model_output(model_input, unet_timesteps[i]), t, latents, **step_kwargs
                )
                x0 = getattr(output, "pred_original_sample", None)
                if trajectory is not None and (i % trajectory_every == 0 or i == last):
                    trajectory.append(
                        TrajectoryStep(t.item(), latents.float().cpu(), None if x0 is None else x0.float().cpu())
                    )
                latents = output.prev_sample
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "pred_original_sample": x0}
                    values = {name: tensors[name] for name in callback_on_step_end_tensor_inputs}
                    latents = callback_on_step_end(self, i, t, values).get("latents", latents)
                if i == last or (i + 1 > warmup and (i + 1) % order == 0):
                    progress.update()
        images = self._postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, trajectory) if return_trajectory else (images,)
        return HFDDPMPipelineOutput(images=images, trajectory=trajectory)

    def _corrector_steps(self, corrector_steps: int | None) -> int:
        if corrector_steps is None:
            # A config swapped into another scheduler class (e.g. DPM-Solver from ours) still carries our key.
            has_corrector = hasattr(self.scheduler, "langevin_step")
            corrector_steps = (self.scheduler.config.get("corrector_steps", 0) or 0) if has_corrector else 0
        check_int("corrector_steps", corrector_steps, 0)
        if corrector_steps and not hasattr(self.scheduler, "langevin_step"):
            raise ValueError(
                f"corrector_steps={corrector_steps} needs a scheduler with a Langevin corrector "
                f"(DDPMPosteriorScheduler); {type(self.scheduler).__name__} has none."
            )
        return int(corrector_steps)

    def _set_timesteps(self, num_inference_steps: int | None, timesteps: Sequence[int] | None) -> None:
        if timesteps is None:
            self.scheduler.set_timesteps(num_inference_steps)
        elif "timesteps" in inspect.signature(self.scheduler.set_timesteps).parameters:
            self.scheduler.set_timesteps(timesteps=list(timesteps))
        else:
            raise ValueError(
                f"{type(self.scheduler).__name__} does not take explicit timesteps; pass num_inference_steps."
            )

    def _initial_noise(self, batch_size: int, generator: Any, latents: torch.Tensor | None) -> torch.Tensor:
        if latents is not None:
            return latents.to(device=self._execution_device, dtype=self.unet.dtype)
        shape = self._sample_shape(batch_size)
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=self.unet.dtype)

    def _step_kwargs(self, generator: Any, eta: float, use_clipped_model_output: bool | None) -> dict[str, Any]:
        kwargs: dict[str, Any] = {}
        if self._scheduler_takes("generator"):  # Heun, LMS, UniPC, DEIS, ... have none
            kwargs["generator"] = generator
        if self._scheduler_takes("eta"):
            kwargs["eta"] = eta
        if use_clipped_model_output is not None and self._scheduler_takes("use_clipped_model_output"):
            kwargs["use_clipped_model_output"] = use_clipped_model_output
        return kwargs

    # --- DDIM inversion ------------------------------------------------------------------------------------------------

    def _images_to_tensor(self, images: Any) -> torch.Tensor:
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if isinstance(images, list):
            mode = "L" if self.unet.config.in_channels == 1 else "RGB"
            images = np.stack([np.asarray(image.convert(mode), dtype=np.float32) / 255.0 for image in images])
            if images.ndim == 3:
                images = images[..., None]
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(images).permute(0, 3, 1, 2) * 2 - 1  # [N, H, W, C] in [0, 1] -> [-1, 1]
        if not torch.is_tensor(images) or images.ndim != 4:
            raise ValueError(
                "images must be PIL images, a numpy array [N, H, W, C] in [0, 1] or a tensor [N, C, H, W] in [-1, 1]."
            )
        expected = self._sample_shape(images.shape[0])
        if tuple(images.shape) != expected:
            raise ValueError(f"images have shape {tuple(images.shape)}; this U-Net takes {expected}.")
        return images.to(device=self._execution_device, dtype=self.unet.dtype)

    @torch.no_grad()
    def invert(self, images: Any, num_inference_steps: int = 50) -> torch.Tensor:
        """DDIM inversion (η = 0): map images to the latents x_T that `__call__(latents=..., eta=0)` maps back.

        Uses a `DDIMPosteriorScheduler` with this scheduler's config, so the same steps are used both ways.
        Returns x_T, [N, C, H, W].
        """
        if not isinstance(self.scheduler, DDIMPosteriorScheduler):
            raise ValueError(
                f"invert needs DDIMPosteriorScheduler; this pipeline has {type(self.scheduler).__name__}. Use "
                "pipe.scheduler = DDIMPosteriorScheduler.from_config(pipe.scheduler.config) first."
            )
        self._check_call(1, num_inference_steps, "pt")
        latents = self._images_to_tensor(images)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.progress_bar(reversed(self.scheduler.timesteps)):
            latents = self.scheduler.inverse_step(self._model_output(latents, t), t, latents).prev_sample
        return latents
