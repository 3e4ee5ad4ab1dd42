"""`python -m hf_ddpm.evaluate` on a saved pipeline: one JSON line with bits/dim and digits-FID."""

import json

import pytest
import torch

from hf_ddpm import DDIMPosteriorScheduler, DDPMUNet, HFDDPMPipeline
from hf_ddpm.evaluate import main
from hf_ddpm.evaluator import EvalConfig, evaluate_pipeline


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    torch.manual_seed(0)
    unet = DDPMUNet(
        sample_size=8, in_channels=1, out_channels=1, base_channels=16, channel_mult=(1, 2), num_res_blocks=1,
        attention_resolutions=(), num_groups=8, dropout=0.0,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny")
    HFDDPMPipeline(unet=unet, scheduler=DDIMPosteriorScheduler(num_train_timesteps=50)).save_pretrained(folder)
    return folder


def test_cli_prints_one_json_line(tiny_pipeline_dir, capsys):
    argv = ["--model", str(tiny_pipeline_dir), "--num_samples", "24", "--steps", "2", "--bpd_mode", "fast"]
    result = main(argv)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line) == json.loads(json.dumps(result))
    assert result["features"] == "digits" and result["num_samples"] == 24
    assert 0 < result["bpd"] < 20 and result["bpd_stderr"] >= 0
    assert result["fid"] > 0 and sum(result["digits"]["class_histogram"]) == 24


def test_bad_metric_and_scheduler(tiny_pipeline_dir):
    real = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"Unknown metrics \['is'\]; allowed: bpd, fid"):
        evaluate_pipeline(None, real, EvalConfig(["is"]))
    with pytest.raises(ValueError, match="Unknown scheduler 'euler'"):
        evaluate_pipeline(None, real, EvalConfig(["bpd"], scheduler="euler"))
    with pytest.raises(SystemExit):
        main(["--model", str(tiny_pipeline_dir), "--scheduler", "euler"])
