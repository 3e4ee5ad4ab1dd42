"""`--calibrate_variance N`: training ends by storing Γ_t (Analytic-DPM) in the saved scheduler config."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_train, tiny_args

from hf_ddpm import DDIMPosteriorScheduler, DDPMPosteriorScheduler, HFDDPMPipeline
from hf_ddpm.calibrate import calibrate_pipeline
from hf_ddpm.data import digits_dataset
from hf_ddpm.evaluator import first_images
from hf_ddpm.training import parse_args


def test_training_stores_the_calibration_of_the_saved_weights(tmp_path):
    result = run_train(tmp_path / "run", "--calibrate_variance", "4", "--ddpm_num_steps", "100")
    config = json.loads((result.output_dir / "scheduler" / "scheduler_config.json").read_text())
    gamma = config["analytic_gamma"]
    assert len(gamma) == 100 and all(value > 0 for value in gamma)

    # The same estimate as calibrating the saved pipeline afterwards from the same images and seed.
    pipe = HFDDPMPipeline.from_pretrained(result.output_dir)
    pipe.scheduler = DDPMPosteriorScheduler.from_config(pipe.scheduler.config, analytic_gamma=None)
    images = first_images(digits_dataset(), 8, 1, 4)
    calibrate_pipeline(pipe, images, seed=parse_args(tiny_args(tmp_path / "x")).seed, progress=False)
    assert pipe.scheduler.config.analytic_gamma == pytest.approx(gamma, rel=1e-5)  # layouts may round apart

    # Both samplers can use it straight from the saved config.
    for cls in (DDPMPosteriorScheduler, DDIMPosteriorScheduler):
        pipe.scheduler = cls.from_config(config, analytic_variance=True)
        out = pipe(batch_size=2, num_inference_steps=5, generator=torch.manual_seed(0), output_type="pt")
        assert torch.isfinite(out.images).all()


def test_training_without_the_flag_stores_no_calibration(tmp_path):
    result = run_train(tmp_path / "run", "--ddpm_num_steps", "100")
    config = json.loads((result.output_dir / "scheduler" / "scheduler_config.json").read_text())
    assert config.get("analytic_gamma") is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--calibrate_variance", "2"], "--calibrate_variance 2"),
        (["--calibrate_variance", "-1"], "--calibrate_variance -1"),
        (["--calibrate_variance", "8", "--loss_type", "hybrid"], "analytic variance replaces a fixed variance"),
    ],
)
def test_bad_calibrate_variance_stops_before_writing(tmp_path, capsys, extra, message):
    output_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(tiny_args(output_dir, *extra))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not output_dir.exists()
