"""HFDDPMPipeline: sampling, schedulers, trajectories, inversion, saving/loading, registration and bad input."""

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, DiffusionPipeline, UNet2DModel
from helpers import run_python, tiny_unet
from safetensors.torch import load_file

import hf_ddpm
from hf_ddpm import DDIMPosteriorScheduler, DDPMPosteriorScheduler, DDPMUNet, HFDDPMPipeline


def _unet(**overrides) -> DDPMUNet:
    return tiny_unet(**overrides)


def _pipeline(scheduler=None, **unet_overrides) -> HFDDPMPipeline:
    pipe = HFDDPMPipeline(unet=_unet(**unet_overrides), scheduler=scheduler or DDIMPosteriorScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _np(pipe, seed=0, **kwargs) -> np.ndarray:
    kwargs = {"batch_size": 2, "num_inference_steps": 4, **kwargs}
    return pipe(generator=torch.manual_seed(seed), output_type="np", **kwargs).images


def test_same_generator_same_images_and_output_types_agree():
    pipe = _pipeline(DDPMPosteriorScheduler())
    a, b = _np(pipe), _np(pipe)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (2, 8, 8, 1) and a.min() >= 0 and a.max() <= 1
    assert not np.allclose(a, _np(pipe, seed=1))
    pt = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0), output_type="pt").images
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), a, atol=1e-7)
    pil = pipe(batch_size=2, num_inference_steps=4, generator=torch.manual_seed(0)).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    np.testing.assert_array_equal(np.asarray(pil[0]), (a[0, ..., 0] * 255).round().astype(np.uint8))


@pytest.mark.parametrize(
    "scheduler",
    [DDPMPosteriorScheduler(), DDIMPosteriorScheduler(), DDPMScheduler(), DDIMScheduler()],
    ids=["ours-ddpm", "ours-ddim", "diffusers-ddpm", "diffusers-ddim"],
)
def test_runs_with_each_scheduler(scheduler):
    images = _np(_pipeline(scheduler))
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_our_and_diffusers_ddim_give_the_same_images():
    ours, theirs = _np(_pipeline(DDIMPosteriorScheduler()), eta=0.0), _np(_pipeline(DDIMScheduler()), eta=0.0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_learned_variance_unet_with_each_scheduler():
    for scheduler in (
        DDPMPosteriorScheduler(variance_type="learned_range"),
        DDPMPosteriorScheduler(),
        DDIMScheduler(),
    ):
        images = _np(_pipeline(scheduler, learned_variance=True))
        assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_trajectory_and_callback():
    pipe = _pipeline(DDIMPosteriorScheduler())
    seen = []

    def callback(pipe, i, t, values):
        seen.append(int(t))
        return values

    out = pipe(
        batch_size=1,
        num_inference_steps=6,
        output_type="pt",
        return_trajectory=True,
        trajectory_every=2,
        callback_on_step_end=callback,
    )
    assert [step.timestep for step in out.trajectory] == [int(t) for t in pipe.scheduler.timesteps[[0, 2, 4, 5]]]
    assert seen == pipe.scheduler.timesteps.tolist()
    assert out.trajectory[0].sample.shape == (1, 1, 8, 8)
    assert out.trajectory[-1].pred_original_sample.shape == (1, 1, 8, 8)


def test_callback_sees_each_steps_prediction_of_x0_and_may_replace_the_latents():
    """x̂_0 handed to the callback equals the trajectory's; a callback that zeroes the latents changes the result."""
    pipe = _pipeline(DDIMPosteriorScheduler())
    seen = []

    def record(pipe, i, t, values):
        seen.append(values["pred_original_sample"].clone())
        return {}

    call = dict(batch_size=2, num_inference_steps=4, output_type="pt", generator=torch.manual_seed(0))
    out = pipe(**call, return_trajectory=True, callback_on_step_end=record,
               callback_on_step_end_tensor_inputs=["latents", "pred_original_sample"])  # fmt: skip
    assert len(seen) == 4 and all(torch.equal(a, b.pred_original_sample) for a, b in zip(seen, out.trajectory))
    plain = pipe(**{**call, "generator": torch.manual_seed(0)}).images
    zeroed = pipe(**{**call, "generator": torch.manual_seed(0)},
                  callback_on_step_end=lambda p, i, t, v: {"latents": torch.zeros_like(v["latents"])}).images  # fmt: skip
    assert not torch.allclose(plain, zeroed)


def test_corrector_steps_run_and_change_the_result():
    pipe = _pipeline(DDPMPosteriorScheduler())
    plain, corrected = _np(pipe), _np(pipe, corrector_steps=1)
    assert np.isfinite(corrected).all() and not np.allclose(plain, corrected)


def test_ddim_inversion_round_trip():
    """With a smooth ε model (a random U-Net with a small output layer), invert -> sample reconstructs, better
    with more steps; the exact-ε case is in test_oracle.py."""
    pipe = _pipeline(DDIMPosteriorScheduler(clip_sample=False))
    pipe.unet.conv_out.weight.data *= 0.02
    images = torch.rand(2, 1, 8, 8) * 1.6 - 0.8
    errors = []
    for steps in (5, 200):
        latents = pipe.invert(images, num_inference_steps=steps)
        back = pipe(latents=latents, num_inference_steps=steps, eta=0.0, output_type="pt").images * 2 - 1
        errors.append((back - images).abs().max().item())
    assert errors[1] < 0.5 * errors[0] and errors[1] < 0.1


def test_diffusers_ddpm_pipeline_runs_our_parts():
    pipe = DDPMPipeline(unet=_unet(), scheduler=DDPMPosteriorScheduler())
    pipe.set_progress_bar_config(disable=True)
    assert pipe(batch_size=1, num_inference_steps=3, output_type="np").images.shape == (1, 8, 8, 1)


def test_save_and_load_from_a_local_folder(tmp_path):
    pipe = _pipeline(DDIMPosteriorScheduler())
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "HFDDPMPipeline"
    assert index["unet"] == ["hf_ddpm", "DDPMUNet"] and index["scheduler"] == ["hf_ddpm", "DDIMPosteriorScheduler"]
    assert not list(tmp_path.rglob("*.bin"))
    for loader in (DiffusionPipeline, HFDDPMPipeline):
        loaded = loader.from_pretrained(tmp_path)
        assert type(loaded) is HFDDPMPipeline and type(loaded.unet) is DDPMUNet
        loaded.set_progress_bar_config(disable=True)
        np.testing.assert_array_equal(_np(loaded), _np(pipe))
    half = DiffusionPipeline.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    half.set_progress_bar_config(disable=True)
    assert half.unet.dtype == torch.bfloat16
    assert np.abs(_np(half) - _np(pipe)).max() < 0.1


def test_swapping_the_scheduler_is_recorded(tmp_path):
    pipe = _pipeline(DDIMPosteriorScheduler())
    pipe.scheduler = DDPMPosteriorScheduler.from_config(pipe.scheduler.config)
    assert pipe.config.scheduler == ("hf_ddpm", "DDPMPosteriorScheduler")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.save_pretrained(tmp_path)
    assert type(DiffusionPipeline.from_pretrained(tmp_path).scheduler) is DDIMScheduler


def test_push_to_hub_then_load_online_in_a_fresh_process(hub_server, fresh_hf_cache, tmp_path):
    pipe = _pipeline(DDIMPosteriorScheduler())
    pipe.push_to_hub("org/tiny")
    expected = _np(pipe, num_inference_steps=2)
    np.save(tmp_path / "expected.npy", expected)
    torch.save(pipe.unet.state_dict(), tmp_path / "weights.pt")
    hub_server.clear_logs()
    code = textwrap.dedent(
        f"""
        import numpy as np, torch
        import hf_ddpm
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained("org/tiny")
        assert type(pipe).__name__ == "HFDDPMPipeline", type(pipe)
        assert type(pipe.unet).__name__ == "DDPMUNet" and type(pipe.scheduler).__name__ == "DDIMPosteriorScheduler"
        pipe.set_progress_bar_config(disable=True)
        expected = torch.load({str(tmp_path / "weights.pt")!r})
        for name, value in pipe.unet.state_dict().items():
            assert torch.equal(value, expected[name]), name
        images = pipe(batch_size=2, num_inference_steps=2, generator=torch.manual_seed(0), output_type="np").images
        np.testing.assert_array_equal(images, np.load({str(tmp_path / "expected.npy")!r}))
        """
    )
    run_python(code)
    # the online path was taken: the model index and the weights came from the server
    paths = [path for _, path in hub_server.request_log]
    assert any("model_index.json" in p for p in paths)
    assert any("diffusion_pytorch_model.safetensors" in p for p in paths)
    # offline, from the cache the online load filled
    run_python(code, env_extra={"HF_HUB_OFFLINE": "1"})


def test_saved_weights_are_safetensors_and_bit_identical(tmp_path):
    pipe = _pipeline()
    pipe.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(saved[name], value)


# --- bad input ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be an integer >= 1, got 0"),
        ({"num_inference_steps": 0}, r"num_inference_steps must be an integer in \[1, 1000\].*got 0"),
        ({"num_inference_steps": 1001}, r"num_inference_steps must be an integer in \[1, 1000\].*got 1001"),
        ({"output_type": "jpg"}, "Unknown output_type 'jpg'; allowed: pil, np, pt"),
        ({"callback_on_step_end_tensor_inputs": ["noise"]}, r"\['noise'\] are not available"),
    ],
)
def test_bad_call_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _pipeline()(**{"batch_size": 1, "num_inference_steps": 2, **kwargs})


def test_sample_size_not_divisible_by_the_downsampling():
    unet = UNet2DModel(
        sample_size=10,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8, 8),
        layers_per_block=1,
        norm_num_groups=8,
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
    )
    pipe = HFDDPMPipeline(unet=unet, scheduler=DDPMPosteriorScheduler())
    with pytest.raises(ValueError, match="sample_size 10 is not divisible by the U-Net's downsampling factor 4"):
        pipe(batch_size=1, num_inference_steps=2)


def test_eta_with_a_scheduler_that_cannot_use_it_warns():
    with pytest.warns(UserWarning, match=r"eta=0.5 is ignored: DDPMPosteriorScheduler has no eta"):
        _pipeline(DDPMPosteriorScheduler())(batch_size=1, num_inference_steps=2, eta=0.5)


def test_corrector_with_a_scheduler_without_one():
    with pytest.raises(ValueError, match="corrector_steps=1 needs a scheduler with a Langevin corrector"):
        _pipeline(DDIMPosteriorScheduler())(batch_size=1, num_inference_steps=2, corrector_steps=1)


@pytest.mark.parametrize(("missing", "expected"), [("unet", "unet/config.json"), ("scheduler", "scheduler_config")])
def test_a_folder_missing_a_component_names_the_file(tmp_path, missing, expected):
    _pipeline().save_pretrained(tmp_path)
    shutil.rmtree(tmp_path / missing)
    for loader in (DiffusionPipeline, HFDDPMPipeline):
        with pytest.raises((ValueError, OSError), match=expected):
            loader.from_pretrained(tmp_path)


def test_registration_is_idempotent_and_refuses_a_clash():
    import diffusers

    hf_ddpm.register_with_diffusers({"HFDDPMPipeline": HFDDPMPipeline})
    assert diffusers.HFDDPMPipeline is HFDDPMPipeline and diffusers.pipelines.hf_ddpm is hf_ddpm
    with pytest.raises(ValueError, match="Cannot register 'DDPMScheduler'.*already holds"):
        hf_ddpm.register_with_diffusers({"DDPMScheduler": DDPMPosteriorScheduler})
    assert diffusers.DDPMScheduler is DDPMScheduler


def test_inversion_needs_our_ddim_scheduler():
    with pytest.raises(ValueError, match="invert needs DDIMPosteriorScheduler"):
        _pipeline(DDPMPosteriorScheduler()).invert(torch.zeros(1, 1, 8, 8), 2)
    with pytest.raises(ValueError, match=r"images have shape \(1, 3, 8, 8\); this U-Net takes \(1, 1, 8, 8\)"):
        _pipeline().invert(torch.zeros(1, 3, 8, 8), 2)
