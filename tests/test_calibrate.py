"""Calibration of Γ_t = E‖ε_θ(x_t, t)‖²/d for the analytic variance: the estimate against the Gaussian oracle's
closed form within its Monte Carlo error, the pipeline and Hub round trip of the calibration, and the CLI."""

import json
import math
import re

import pytest
import torch
from helpers import MEAN, STD, GaussianOracle, tiny_unet, write_image_folder

from hf_ddpm import DDIMPosteriorScheduler, DDPMPosteriorScheduler, HFDDPMPipeline
from hf_ddpm import diffusion as D
from hf_ddpm.calibrate import calibrate_pipeline, estimate_gamma, main


def _oracle_images(count: int = 64) -> torch.Tensor:
    return MEAN + STD * torch.randn(count, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def test_calibrated_gamma_matches_the_closed_form_within_its_monte_carlo_error():
    process = DDPMPosteriorScheduler().diffusion
    ab = process.alphas_cumprod
    estimate = estimate_gamma(
        GaussianOracle(ab), process, _oracle_images(), batch_size=4096, generator=torch.manual_seed(1), progress=False
    )
    closed_form = (1 - ab) / (ab * STD**2 + 1 - ab)
    z = (estimate.gamma - closed_form) / estimate.stderr
    assert estimate.gamma.shape == estimate.stderr.shape == (1000,) and estimate.num_samples == 64
    assert z.abs().max() < 5  # 1000 timesteps: a 5σ miss anywhere would be a wrong estimate or a wrong error
    assert 0.9 < (z.abs() < 2).double().mean() < 0.99  # the error is an honest standard error (~95% within 2σ)
    assert (estimate.stderr > 0).all()


def test_x0_and_v_models_give_the_same_gamma_as_the_eps_model():
    process = DDPMPosteriorScheduler(num_train_timesteps=50).diffusion
    oracle = GaussianOracle(process.alphas_cumprod)

    def as_prediction(kind):
        def model(x_t, t):
            alpha_bar = process.alpha_bar(t, x_t)
            eps = oracle(x_t, t)
            x0 = D.x0_from_eps(x_t, eps, alpha_bar)
            return x0 if kind == "sample" else D.v_from_x0_eps(x0, eps, alpha_bar)

        return model

    images = _oracle_images(8)
    runs = {
        kind: estimate_gamma(model, process, images, kind, 64, torch.manual_seed(2), progress=False).gamma
        for kind, model in [
            ("epsilon", oracle),
            ("sample", as_prediction("sample")),
            ("v_prediction", as_prediction("v")),
        ]
    }
    torch.testing.assert_close(runs["sample"], runs["epsilon"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(runs["v_prediction"], runs["epsilon"], rtol=1e-9, atol=1e-9)


def test_estimate_gamma_rejects_too_few_images():
    process = DDPMPosteriorScheduler(num_train_timesteps=10).diffusion
    with pytest.raises(ValueError, match="at least 3 images per timestep, got 2"):
        estimate_gamma(GaussianOracle(process.alphas_cumprod), process, _oracle_images(2))


# --- the pipeline, saved, pushed and loaded online -------------------------------------------------------------------


def _tiny_pipeline(num_train_timesteps: int = 20) -> HFDDPMPipeline:
    pipe = HFDDPMPipeline(unet=tiny_unet(), scheduler=DDPMPosteriorScheduler(num_train_timesteps=num_train_timesteps))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_calibration_round_trips_through_the_hub_and_samples_with_analytic_variance(hub_server, fresh_hf_cache):
    pipe = _tiny_pipeline()
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    estimate = calibrate_pipeline(pipe, images, batch_size=32, progress=False)
    gamma = list(pipe.scheduler.config.analytic_gamma)
    assert len(gamma) == 20 and gamma == pytest.approx(estimate.gamma.tolist(), rel=1e-6)
    assert pipe.scheduler._gamma is not None  # the scheduler was rebuilt with it, not only its config edited
    pipe.push_to_hub("org/calibrated")
    hub_server.clear_logs()
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained("org/calibrated")  # online, into the empty cache of fresh_hf_cache
    assert any("scheduler_config.json" in path for _, path in hub_server.request_log)
    assert list(loaded.scheduler.config.analytic_gamma) == gamma
    loaded.set_progress_bar_config(disable=True)
    for cls in (DDPMPosteriorScheduler, DDIMPosteriorScheduler):
        loaded.scheduler = cls.from_config(loaded.scheduler.config, analytic_variance=True)
        images = loaded(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(0), output_type="pt").images
        assert torch.isfinite(images).all()


def test_a_model_without_calibration_asked_for_analytic_variance_names_the_command(tmp_path):
    _tiny_pipeline().save_pretrained(tmp_path)
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"python -m hf_ddpm\.calibrate --model DIR --dataset DATASET --num_samples M"
    ):
        DDIMPosteriorScheduler.from_config(pipe.scheduler.config, analytic_variance=True)


# --- the CLI ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def saved_pipeline(tmp_path):
    folder = tmp_path / "model"
    _tiny_pipeline().save_pretrained(folder)
    return folder


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "images", count=6, corrupt=False)


def test_cli_updates_the_model_in_place_and_reports_the_error(saved_pipeline, image_folder, capsys):
    result = main(
        ["--model", str(saved_pipeline), "--dataset", str(image_folder), "--num_samples", "4", "--no_progress"]
    )
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == result and result["num_samples"] == 4 and result["num_timesteps"] == 20
    assert math.isfinite(result["stderr_max"]) and result["stderr_max"] > 0
    config = json.loads((saved_pipeline / "scheduler" / "scheduler_config.json").read_text())
    assert len(config["analytic_gamma"]) == 20 and config["_class_name"] == "DDPMPosteriorScheduler"
    assert not [p for p in saved_pipeline.rglob("*.tmp")]


def test_cli_output_writes_a_whole_calibrated_copy(saved_pipeline, image_folder, tmp_path):
    before = (saved_pipeline / "scheduler" / "scheduler_config.json").read_text()
    out = tmp_path / "calibrated"
    main(["--model", str(saved_pipeline), "--dataset", str(image_folder), "--num_samples", "3",
          "--output", str(out), "--no_progress"])  # fmt: skip
    assert (saved_pipeline / "scheduler" / "scheduler_config.json").read_text() == before
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(out)
    assert len(loaded.scheduler.config.analytic_gamma) == 20
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--num_samples", "2"], "--num_samples must be >= 3 .images per timestep., got 2"),
        (["--num_samples", "4", "--batch_size", "0"], "--batch_size must be >= 1, got 0"),
    ],
)
def test_cli_rejects_bad_numbers(saved_pipeline, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(saved_pipeline), *args])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_cli_rejects_a_missing_model_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path / "nowhere"), "--num_samples", "4"])
    assert "no pipeline folder there (no model_index.json)" in capsys.readouterr().err


def test_cli_rejects_a_hub_id_without_output(capsys):
    with pytest.raises(SystemExit):
        main(["--model", "org/not-a-folder", "--num_samples", "4"])
    assert "cannot be updated in place (pass --output DIR" in capsys.readouterr().err


def test_cli_refuses_a_non_empty_output_folder(saved_pipeline, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        main(["--model", str(saved_pipeline), "--num_samples", "4", "--output", str(tmp_path / "taken")])
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_cli_with_too_few_images_leaves_the_model_untouched(saved_pipeline, image_folder):
    before = (saved_pipeline / "scheduler" / "scheduler_config.json").read_text()
    with pytest.raises(ValueError, match="has 6 readable image.s., fewer than --num_samples 50"):
        main(["--model", str(saved_pipeline), "--dataset", str(image_folder), "--num_samples", "50", "--no_progress"])
    assert (saved_pipeline / "scheduler" / "scheduler_config.json").read_text() == before


def test_calibrating_a_pipeline_without_a_posterior_scheduler_is_refused():
    from diffusers import DDPMScheduler

    pipe = HFDDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(num_train_timesteps=10))
    with pytest.raises(ValueError, match="DDPMScheduler has no analytic variance"):
        calibrate_pipeline(pipe, torch.zeros(3, 1, 8, 8), progress=False)
