"""`HFDDPMPipeline.from_diffusers`: a diffusers DDPMPipeline/DDIMPipeline repository (laid out as google/ddpm-cifar10-32)
loads as our pipeline, online and from a folder, samples as diffusers' own pipeline does, and bad repositories fail in
one line before any weights are read. Also the Space's `load_pipeline` on such a repository."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMPipeline, DDPMPipeline, UNet2DModel
from huggingface_hub import HfApi
from safetensors.torch import load_file, save_file

from hf_ddpm import DDIMPosteriorScheduler, DDPMPosteriorScheduler, DDPMUNet, HFDDPMPipeline
from hf_ddpm.models.diffusers_conversion import (
    _FROM_DIFFUSERS,
    GOOGLE_DDPM_CIFAR10_UNET2D,
    _rename,
    ddpm_unet_config_from_diffusers,
)
from hf_ddpm.models.unet import UNET_PRESETS

SPACE_DIR = Path(__file__).resolve().parents[1] / "spaces" / "hf-ddpm"

# google/ddpm-cifar10-32 as published (diffusers 0.1.1 wrote it): its model_index.json, scheduler_config.json, and a
# config.json with only the keys of GOOGLE_DDPM_CIFAR10_UNET2D that it holds (the rest take UNet2DModel's defaults).
GOOGLE_MODEL_INDEX = {
    "_class_name": "DDPMPipeline",
    "_diffusers_version": "0.1.1",
    "scheduler": ["diffusers", "DDPMScheduler"],
    "unet": ["diffusers", "UNet2DModel"],
}
GOOGLE_SCHEDULER = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.1.1",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "clip_sample": True,
    "num_train_timesteps": 1000,
    "trained_betas": None,
    "variance_type": "fixed_small",
}
NOT_IN_GOOGLE_CONFIG = ("resnet_time_scale_shift", "dropout")
# The same layout (4 levels, 2 blocks each, attention at 16x16 only, 32x32 images), a quarter of the channels.
SMALL_CHANNELS = {"block_out_channels": [32, 64, 64, 64]}


def write_google_like_repo(folder: Path, unet_overrides: dict | None = None, seed: int = 0, **index_overrides) -> Path:
    """A folder laid out exactly like google/ddpm-cifar10-32, with random U-Net weights in safetensors and, as the real
    repo, a pickled `.bin` beside them that must never be read (here it is not even a pickle)."""
    config = {k: list(v) if isinstance(v, tuple) else v for k, v in GOOGLE_DDPM_CIFAR10_UNET2D.items()}
    config = {k: v for k, v in config.items() if k not in NOT_IN_GOOGLE_CONFIG}
    config = {"_class_name": "UNet2DModel", "_diffusers_version": "0.1.1", **config, **SMALL_CHANNELS}
    config.update(unet_overrides or {})
    (folder / "unet").mkdir(parents=True)
    (folder / "scheduler").mkdir()
    index = {k: v for k, v in {**GOOGLE_MODEL_INDEX, **index_overrides}.items() if v is not None}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(GOOGLE_SCHEDULER, indent=2))
    (folder / "unet" / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    weights = GOOGLE_DDPM_CIFAR10_UNET2D | SMALL_CHANNELS
    save_file(UNet2DModel(**weights).state_dict(), folder / "unet" / "diffusion_pytorch_model.safetensors")
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"a pickle that must not be loaded")
    return folder


@pytest.fixture(scope="module")
def google_like(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_google_like_repo(tmp_path_factory.mktemp("ddpm-cifar10-32"))


def _assert_converted(pipe: HFDDPMPipeline, folder: Path) -> None:
    assert type(pipe) is HFDDPMPipeline and type(pipe.unet) is DDPMUNet
    assert type(pipe.scheduler) is DDPMPosteriorScheduler
    for key, value in GOOGLE_SCHEDULER.items():
        if not key.startswith("_"):
            assert pipe.scheduler.config[key] == value, key
    assert pipe.unet.config.attention_resolutions == (16,) and pipe.unet.config.channel_mult == (1, 2, 2, 2)
    theirs = load_file(folder / "unet" / "diffusion_pytorch_model.safetensors")
    ours = pipe.unet.state_dict()
    assert len(ours) == len(theirs)
    for key, value in theirs.items():
        assert torch.equal(ours[_rename(key, _FROM_DIFFUSERS)], value), key


def test_the_full_size_google_config_is_the_papers_cifar10_model(tmp_path):
    """The real config.json (keys an old diffusers wrote, the rest defaulted) maps to the `ddpm-cifar10` preset; no
    weights are built, which keeps this cheap (35.7M parameters)."""
    config = json.loads((write_google_like_repo(tmp_path / "repo") / "unet" / "config.json").read_text())
    config.update(block_out_channels=list(GOOGLE_DDPM_CIFAR10_UNET2D["block_out_channels"]))
    ours = ddpm_unet_config_from_diffusers(config)
    preset = {**UNET_PRESETS["ddpm-cifar10"], "dropout": 0.0}  # the released config.json has no dropout (default 0)
    assert {k: ours[k] for k in preset} == preset


def test_online_from_a_fresh_cache_downloads_only_what_it_needs(hub_server, fresh_hf_cache, google_like):
    api = HfApi()
    api.create_repo("google/ddpm-cifar10-32", exist_ok=True)
    api.upload_folder(repo_id="google/ddpm-cifar10-32", folder_path=google_like)
    hub_server.clear_logs()
    pipe = HFDDPMPipeline.from_diffusers("google/ddpm-cifar10-32")
    _assert_converted(pipe, google_like)
    files = [path for _, path in hub_server.request_log if "/resolve/" in path]
    assert any(p.endswith("/model_index.json") for p in files)
    assert any(p.endswith("/unet/diffusion_pytorch_model.safetensors") for p in files)
    assert not any(p.endswith(".bin") for p in files)
    # The online load filled the cache: the same call works without the server.
    again = HFDDPMPipeline.from_diffusers("google/ddpm-cifar10-32", local_files_only=True)
    _assert_converted(again, google_like)


def test_a_bad_repo_on_the_hub_fails_before_its_weights_are_downloaded(hub_server, fresh_hf_cache, tmp_path):
    folder = write_google_like_repo(tmp_path / "repo", unet_overrides={"class_embed_type": "timestep"})
    api = HfApi()
    api.create_repo("org/class-conditional-ddpm", exist_ok=True)
    api.upload_folder(repo_id="org/class-conditional-ddpm", folder_path=folder)
    hub_server.clear_logs()
    with pytest.raises(ValueError, match="class_embed_type='timestep'"):
        HFDDPMPipeline.from_diffusers("org/class-conditional-ddpm")
    assert not any("safetensors" in path for _, path in hub_server.request_log)
    assert not list(fresh_hf_cache.rglob("*.safetensors"))


def test_a_local_folder(google_like):
    _assert_converted(HFDDPMPipeline.from_diffusers(google_like), google_like)
    _assert_converted(HFDDPMPipeline.from_diffusers(str(google_like)), google_like)


# Where ours and diffusers' samplers are specified to agree (README, "Where we differ from diffusers"): DDPM over
# respaced "leading" steps, whose previous timestep is on the list for both and whose last step is t = 0 (no noise for
# either), and DDIM at η = 0. The same generator draws the same x_T and the same per-step noise: both pipelines draw
# x_T first, then one noise tensor per DDPM step but the last. Our float64 tables part from diffusers' float32 ones
# only at many steps (1 - ᾱ_t/ᾱ_{t-1} at small t), not over 10 respaced ones.
# DDIM runs in float64: with an untrained ε-network DDIM's deterministic map expands differences by about
# √(ᾱ_{t-1}/ᾱ_t) per step (a trained ε̂ tracks the noise in x_t and cancels it), about 70x from t = 900 to 0, so the
# two U-Nets' float32 rounding (about 1e-6 apart: ours runs channels_last, with another attention kernel) would grow
# to about 1e-3. In float64 that rounding vanishes and the comparison is of the converted weights and the math.
@pytest.mark.parametrize(
    "pipeline_class, their_pipeline, dtype, call",
    [
        ("DDPMPipeline", DDPMPipeline, torch.float32, {"num_inference_steps": 10}),
        ("DDIMPipeline", DDIMPipeline, torch.float64, {"num_inference_steps": 10, "eta": 0.0}),
    ],
)
def test_images_equal_diffusers_own_pipeline(tmp_path, pipeline_class, their_pipeline, dtype, call):
    folder = write_google_like_repo(tmp_path / "repo", seed=1, _class_name=pipeline_class)
    ours = HFDDPMPipeline.from_diffusers(folder).to(dtype)
    expected_scheduler = DDIMPosteriorScheduler if pipeline_class == "DDIMPipeline" else DDPMPosteriorScheduler
    assert type(ours.scheduler) is expected_scheduler
    theirs = their_pipeline.from_pretrained(folder, dtype=dtype)
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, output_type="np", **call)
    with torch.no_grad():
        expected = theirs(generator=torch.Generator().manual_seed(3), **kwargs).images
        images = ours(generator=torch.Generator().manual_seed(3), **kwargs).images
    assert images.shape == expected.shape == (2, 32, 32, 3)
    assert expected.std() > 0.05 and ((expected > 0) & (expected < 1)).mean() > 0.5  # neither constant nor clipped
    np.testing.assert_allclose(images, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "index, unet, message",
    [
        ({"_class_name": "StableDiffusionPipeline"}, {},
         r"model_index.json has _class_name='StableDiffusionPipeline'; allowed: DDPMPipeline, DDIMPipeline\.$"),
        ({"_class_name": "HFDDPMPipeline"}, {}, r"HFDDPMPipeline.from_pretrained\); allowed: DDPMPipeline"),
        ({"unet": None}, {}, r"unet=None; allowed: \['diffusers', 'UNet2DModel'\]"),
        ({"unet": ["diffusers", "UNet2DConditionModel"]}, {}, r"unet=\['diffusers', 'UNet2DConditionModel'\]; allowed"),
        ({"scheduler": None}, {}, r"scheduler=None; allowed: \['diffusers', 'DDPMScheduler'\], \['diffusers', 'DDIM"),
        ({"scheduler": ["diffusers", "PNDMScheduler"]}, {},
         r"scheduler class 'PNDMScheduler', which has no hf_ddpm scheduler; allowed: DDPMScheduler, DDIMScheduler\.$"),
        ({}, {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
         r"unet/config.json: .*down block type 'CrossAttnDownBlock2D' \(supported: DownBlock2D, AttnDownBlock2D\)"),
        ({}, {"class_embed_type": "timestep"}, r"unet/config.json: .*class_embed_type='timestep' \(DDPMUNet supports None"),
        ({}, {"num_class_embeds": 10}, r"unet/config.json: .*num_class_embeds=10 \(DDPMUNet supports None\)"),
        ({}, {"time_embedding_type": "fourier"}, r"time_embedding_type='fourier' \(DDPMUNet supports 'positional'\)"),
    ],
)  # fmt: skip
def test_bad_repos_fail_in_one_line_naming_the_value(tmp_path, index, unet, message):
    folder = write_google_like_repo(tmp_path / "repo", unet_overrides=unet, **index)
    with pytest.raises(ValueError, match=message) as info:
        HFDDPMPipeline.from_diffusers(folder)
    assert str(info.value).startswith(str(folder)) and "\n" not in str(info.value)


def test_missing_files_and_folders_fail_in_one_line(tmp_path, google_like):
    no_safetensors = Path(shutil.copytree(google_like, tmp_path / "bin-only"))
    (no_safetensors / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    no_index = Path(shutil.copytree(google_like, tmp_path / "no-index"))
    (no_index / "model_index.json").unlink()
    no_scheduler = Path(shutil.copytree(google_like, tmp_path / "no-scheduler"))
    shutil.rmtree(no_scheduler / "scheduler")
    for folder, message in [
        (
            no_safetensors,
            "has no unet/diffusion_pytorch_model.safetensors; hf_ddpm loads U-Net weights from safetensors",
        ),
        (no_index, "has no model_index.json: it is not a diffusers DDPMPipeline/DDIMPipeline repository"),
        (no_scheduler, "has no scheduler/scheduler_config.json"),
        (tmp_path / "missing", "There is no folder"),
    ]:
        with pytest.raises(ValueError, match=message) as info:
            HFDDPMPipeline.from_diffusers(folder)
        assert "\n" not in str(info.value)


@pytest.fixture
def ddpm_space(monkeypatch):
    monkeypatch.syspath_prepend(str(SPACE_DIR))  # app.py imports its sibling ddpm_space, as on a Space
    import ddpm_space

    return ddpm_space


def test_space_serves_a_diffusers_ddpm_repo(ddpm_space, google_like):
    pipe, notice = ddpm_space.load_pipeline(str(google_like))
    assert notice == ""
    _assert_converted(pipe, google_like)
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


def test_space_names_why_a_diffusers_repo_was_not_loaded(ddpm_space, tmp_path):
    folder = write_google_like_repo(tmp_path / "repo", scheduler=["diffusers", "PNDMScheduler"])
    pipe, notice = ddpm_space.load_pipeline(str(folder))
    assert "'PNDMScheduler', which has no hf_ddpm scheduler" in notice
    assert "Serving the bundled digits model instead" in notice
    assert pipe.unet.config.sample_size != 32  # the bundled digits model
