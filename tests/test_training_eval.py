"""Evaluation during training (`--eval_steps`): the metrics of `hf_ddpm.evaluate` in training_metrics.json, the
card and the log; bad evaluation flags; a few hundred digits steps lower bits/dim and digits-FID; two processes
share the budget."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import accelerate_launch, run_train, tiny_args, tiny_unet, train_cmd, write_image_folder

from hf_ddpm import DDPMPosteriorScheduler, HFDDPMPipeline
from hf_ddpm.evaluator import EvalConfig, Evaluator, Shard
from hf_ddpm.training import TrainingInputError, parse_args, train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_reach_the_history_the_card_and_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="hf_ddpm.training.loop")
    out = tmp_path / "digits"
    result = run_train(out, "--eval_steps", "2", "--eval_num_samples", "12", "--eval_sample_steps", "3")
    history = json.loads((out / "training_metrics.json").read_text())["eval_history"]
    assert history == json.loads(json.dumps(result.metrics.eval_history))
    assert [e["step"] for e in history] == [0, 2, 4]
    for entry in history:
        assert {"eval/loss_ema", "eval/loss_raw", "eval/bpd", "eval/bpd_stderr", "eval/fid"} <= entry.keys()
        assert entry["eval/bpd_images"] == entry["eval/fid_samples"] == 12
        assert 0 < entry["eval/bpd"] < 20 and entry["eval/fid"] > 0 and entry["eval/seconds"] > 0
    card = (out / "README.md").read_text()
    last = history[-1]
    assert f"| Bits/dim (fast variational bound, EMA weights, first 12 images) | {last['eval/bpd']:.4f} ± " in card
    assert "| FID (digits features, 12 DDIM-3 samples of the EMA weights vs the first 12 images) | " in card
    assert f"{last['eval/fid']:.4g} (step 4) |" in card
    assert f"| Evaluation time | {sum(e['eval/seconds'] for e in history):.0f} s over 3 evaluations |" in card
    assert "evaluation at step 4 took" in caplog.text and f"bpd {last['eval/bpd']:.4g}" in caplog.text

    # Another dataset has no FID features unless named: bits/dim only. `none` keeps the fixed-batch loss alone.
    folder = write_image_folder(tmp_path / "images", count=12, corrupt=False)
    other = run_train(tmp_path / "folder", "--train_data_dir", str(folder), "--cache_dir", str(tmp_path / "c"),
                      "--eval_steps", "4", "--eval_num_samples", "8")  # fmt: skip
    assert [sorted(e) for e in other.metrics.eval_history] == 2 * [
        ["eval/bpd", "eval/bpd_images", "eval/bpd_stderr", "eval/loss_ema", "eval/loss_raw", "eval/seconds", "step"]
    ]
    assert other.metrics.eval_history[0]["eval/bpd_images"] == 8
    assert "| FID (" not in (tmp_path / "folder" / "README.md").read_text()
    loss_only = run_train(tmp_path / "loss", "--eval_steps", "4", "--eval_metrics", "none", "--no-use_ema")
    assert [sorted(e) for e in loss_only.metrics.eval_history] == 2 * [["eval/loss_raw", "eval/seconds", "step"]]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--eval_num_samples", "1"], "--eval_num_samples must be >= 2 (FID needs a covariance), got 1."),
        (["--eval_sample_steps", "0"], "--eval_sample_steps must lie in [1, --ddpm_num_steps 1000], got 0."),
        (["--eval_sample_steps", "1001"], "--eval_sample_steps must lie in [1, --ddpm_num_steps 1000], got 1001."),
        (["--eval_metrics", "bpd,is"], "--eval_metrics 'bpd,is': unknown ['is']"),
        (["--eval_metrics", ""], "--eval_metrics '': unknown empty list"),
        (["--eval_features", "resnet"], "--eval_features: Unknown features 'resnet'"),
        (["--eval_metrics", "fid", "--dataset_name", "user/cats"], "--eval_metrics fid needs --eval_features"),
        (["--eval_bpd_mode", "slow"], "argument --eval_bpd_mode: invalid choice: 'slow'"),
        (["--eval_steps", "-1"], "--eval_steps must be >= 0, got -1."),
    ],
)
def test_bad_eval_flags_are_refused_naming_the_flag(tmp_path: Path, capsys, flags: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(tiny_args(tmp_path / "out", "--eval_steps", "2", *flags))
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unavailable_features_are_refused_before_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no Inception weights there
    monkeypatch.delenv("HF_DDPM_INCEPTION_WEIGHTS", raising=False)
    out = tmp_path / "out"
    with pytest.raises(TrainingInputError, match="--eval_features inception: Inception-v3 FID weights"):
        run_train(out, "--eval_steps", "2", "--eval_features", "inception")
    assert not out.exists()


def test_a_few_hundred_digits_steps_lower_bits_per_dim_and_fid(tmp_path: Path) -> None:
    """The digits preset (its 650k-parameter U-Net at 16x16, cosine β, min-SNR) at batch 32 for 300 steps, evaluated
    at step 0 (the untrained start) and at the end by the run itself: 64 real images, 64 DDIM-20 samples.
    Measured on 2 busy cores: 37-68 s; bits/dim 8.23 -> 5.31, digits-FID 242 -> 55."""
    result = train(
        parse_args([
            "--output_dir", str(tmp_path / "digits"), "--max_train_steps", "300", "--train_batch_size", "32",
            "--lr_warmup_steps", "50", "--eval_steps", "300", "--save_images_steps", "0",
            "--checkpointing_steps", "0", "--logger", "none",
        ])
    )  # fmt: skip
    start, end = result.metrics.eval_history
    assert (start["step"], end["step"]) == (0, 300)
    assert start["eval/fid_samples"] == end["eval/fid_samples"] == 64
    assert end["eval/bpd"] < start["eval/bpd"] - 1.0, (start, end)
    assert end["eval/fid"] < 0.5 * start["eval/fid"], (start, end)


def test_shards_split_the_budget() -> None:
    """In one process: two shards of 11 samples take 5 and 6, and process 0 combines both; process 1 gets None."""
    assert [Shard(i, 2).part(11) for i in range(2)] == [slice(0, 5), slice(5, 11)]
    assert [len(range(11)[Shard(i, 3).part(11)]) for i in range(3)] == [3, 4, 4]
    pipe = HFDDPMPipeline(unet=tiny_unet(), scheduler=DDPMPosteriorScheduler(num_train_timesteps=20))
    pipe.set_progress_bar_config(disable=True)
    real = torch.rand(11, 1, 8, 8) * 2 - 1
    sent: list = []
    config = EvalConfig(num_samples=11, steps=2)
    second = Evaluator(real, config, shard=Shard(1, 2, lambda obj: sent.append(obj) or []))
    assert second(pipe) is None
    first = Evaluator(real, config, shard=Shard(0, 2, lambda obj: [obj, *sent]))
    result = first(pipe)
    assert (result["bpd_images"], result["fid_samples"], result["digits"]["count"]) == (11, 11, 11)
    assert len(sent[0]["features"]) == len(sent[0]["real_features"]) == len(sent[0]["bpd"]["total"]) == 6
    # The real statistics come from both shares, once: later calls send no real features.
    assert first.real_stats().count == 11
    second(pipe)
    assert "real_features" not in sent[1] and len(sent[1]["features"]) == 6


def test_two_processes_share_the_evaluation(tmp_path: Path) -> None:
    """`accelerate launch` with 2 processes: each evaluates its share, the main process logs the whole budget."""
    out = tmp_path / "ddp"
    flags = ["--eval_steps", "3", "--eval_num_samples", "11", "--eval_sample_steps", "2"]
    cmd = accelerate_launch(2) + train_cmd(out, *flags, steps=6)[1:]  # train.py and its flags, without the python
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    history = json.loads((out / "training_metrics.json").read_text())["eval_history"]
    assert [e["step"] for e in history] == [0, 3, 6]
    for entry in history:
        assert entry["eval/bpd_images"] == entry["eval/fid_samples"] == 11  # the whole budget, not one share
        assert entry["eval/bpd"] > 0 and entry["eval/fid"] > 0
    assert log.count("evaluation at step 6 took") == 1  # logged once, by the main process
