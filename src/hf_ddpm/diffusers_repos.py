"""Loading a diffusers `DDPMPipeline` / `DDIMPipeline` repository (e.g. `google/ddpm-cifar10-32`) as our parts.

Such a repository holds `model_index.json`, `unet/` (a `UNet2DModel`) and `scheduler/` (a `DDPMScheduler` or
`DDIMScheduler`). Its U-Net converts to a `DDPMUNet` with the same weights (`models/diffusers_conversion.py`), its
scheduler config loads into ours with `from_config` (the keys are diffusers', see `schedulers/`). Everything is
checked from the small JSON files first, so a repository we cannot convert fails before its weights are downloaded;
the weights are read from safetensors only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

from .models.diffusers_conversion import ddpm_unet_config_from_diffusers, unet_from_diffusers
from .models.unet import DDPMUNet
from .schedulers import DDIMPosteriorScheduler, DDPMPosteriorScheduler, PosteriorSchedulerBase

__all__ = ["DIFFUSERS_PIPELINES", "DIFFUSERS_SCHEDULERS", "is_diffusers_ddpm_repo", "load_diffusers_ddpm_parts"]

DIFFUSERS_PIPELINES = ("DDPMPipeline", "DDIMPipeline")
# diffusers' scheduler class -> ours. A DDIMPipeline samples with DDIM whatever scheduler it saved (diffusers converts
# it in DDIMPipeline.__init__), a DDPMPipeline with the saved one.
DIFFUSERS_SCHEDULERS: dict[str, type[PosteriorSchedulerBase]] = {
    "DDPMScheduler": DDPMPosteriorScheduler,
    "DDIMScheduler": DDIMPosteriorScheduler,
}
MODEL_INDEX = "model_index.json"
UNET_CONFIG = "unet/config.json"
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"


def _local_folder(source: str | os.PathLike) -> Path | None:
    path = Path(source).expanduser()
    return path if path.is_dir() else None


def _fetch(source: str | os.PathLike, filenames: list[str], hub_kwargs: dict[str, Any]) -> Path:
    """The folder holding `filenames` of `source` (those it has): a local folder itself, else a Hub snapshot in the
    cache with only these files downloaded."""
    folder = _local_folder(source)
    if folder is not None:
        return folder
    text = str(source)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:  # a repo id is `name` or `org/name`
        raise ValueError(
            f"There is no folder {text!r} (and it is not a Hub repo id such as 'google/ddpm-cifar10-32')."
        )
    return Path(snapshot_download(str(source), allow_patterns=filenames, **hub_kwargs))


def _read_json(folder: Path, filename: str, source: str | os.PathLike) -> dict[str, Any]:
    path = folder / filename
    if not path.is_file():
        raise ValueError(f"{source} has no {filename}: it is not a diffusers DDPMPipeline/DDIMPipeline repository.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: {filename} is not valid JSON ({err}).") from None


def is_diffusers_ddpm_repo(source: str | os.PathLike, **hub_kwargs: Any) -> bool:
    """Whether `source` (a Hub repo id or a local folder) is a diffusers DDPMPipeline/DDIMPipeline, judged from its
    `model_index.json` alone (False when it has none); Hub errors such as a missing repository propagate."""
    folder = _fetch(source, [MODEL_INDEX], hub_kwargs)
    if not (folder / MODEL_INDEX).is_file():
        return False
    return _read_json(folder, MODEL_INDEX, source).get("_class_name") in DIFFUSERS_PIPELINES


def _check_model_index(index: dict[str, Any], source: str | os.PathLike) -> str:
    """The diffusers scheduler class a diffusers pipeline's `model_index.json` samples with; ValueError for a
    `model_index.json` of anything else."""
    pipeline = index.get("_class_name")
    if pipeline not in DIFFUSERS_PIPELINES:
        hint = (
            " (an hf_ddpm pipeline: load it with HFDDPMPipeline.from_pretrained)"
            if pipeline == "HFDDPMPipeline"
            else ""
        )
        raise ValueError(
            f"{source}: model_index.json has _class_name={pipeline!r}{hint}; allowed: {', '.join(DIFFUSERS_PIPELINES)}."
        )
    unet = index.get("unet")
    if unet != ["diffusers", "UNet2DModel"]:
        raise ValueError(f"{source}: model_index.json has unet={unet!r}; allowed: ['diffusers', 'UNet2DModel'].")
    scheduler = index.get("scheduler")
    allowed = ", ".join(f"['diffusers', {name!r}]" for name in DIFFUSERS_SCHEDULERS)
    if not (isinstance(scheduler, list) and len(scheduler) == 2 and scheduler[0] == "diffusers"):
        raise ValueError(f"{source}: model_index.json has scheduler={scheduler!r}; allowed: {allowed}.")
    if scheduler[1] not in DIFFUSERS_SCHEDULERS:
        raise ValueError(
            f"{source}: model_index.json has scheduler class {scheduler[1]!r}, which has no hf_ddpm scheduler; "
            f"allowed: {', '.join(DIFFUSERS_SCHEDULERS)}."
        )
    return "DDIMScheduler" if pipeline == "DDIMPipeline" else scheduler[1]


def load_diffusers_ddpm_parts(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> tuple[DDPMUNet, PosteriorSchedulerBase]:
    """The U-Net and scheduler of a diffusers DDPMPipeline/DDIMPipeline (Hub repo id or local folder) as ours.

    The pipeline's configs are checked first; only then are the U-Net weights read, from
    `unet/diffusion_pytorch_model.safetensors` (a pickled `.bin` is never loaded). Hub arguments are
    `huggingface_hub`'s. ValueError, in one line, for a repository that is not such a pipeline or whose U-Net or
    scheduler we cannot convert.
    """
    import diffusers  # its classes by name, kept out of this module's namespace (see DESIGN.md)

    hub_kwargs = dict(revision=revision, cache_dir=cache_dir, token=token, local_files_only=local_files_only)
    folder = _fetch(source, [MODEL_INDEX, UNET_CONFIG, SCHEDULER_CONFIG], hub_kwargs)
    scheduler_class = _check_model_index(_read_json(folder, MODEL_INDEX, source), source)
    try:
        ddpm_unet_config_from_diffusers(_read_json(folder, UNET_CONFIG, source))
    except ValueError as err:
        raise ValueError(f"{source}: {UNET_CONFIG}: {err}") from None
    # Through diffusers' class first, so that its defaults and key upgrades apply as in its own pipeline.
    their_scheduler = getattr(diffusers, scheduler_class).from_config(_read_json(folder, SCHEDULER_CONFIG, source))
    try:
        scheduler = DIFFUSERS_SCHEDULERS[scheduler_class].from_config(their_scheduler.config)
    except ValueError as err:
        raise ValueError(f"{source}: {SCHEDULER_CONFIG}: {err}") from None

    if _local_folder(source) is None:  # pinned to the configs' commit, which names the snapshot folder
        _fetch(source, [UNET_WEIGHTS], {**hub_kwargs, "revision": folder.name})
    if not (folder / UNET_WEIGHTS).is_file():
        raise ValueError(
            f"{source} has no {UNET_WEIGHTS}; hf_ddpm loads U-Net weights from safetensors only (never a pickled .bin)."
        )
    unet2d = diffusers.UNet2DModel.from_pretrained(folder, subfolder="unet", use_safetensors=True)
    return unet_from_diffusers(unet2d), scheduler
