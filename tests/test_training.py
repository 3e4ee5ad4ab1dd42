"""Tests for hf_ddpm.training: runs on each data source, bit-exact resume after SIGKILL, two processes, Hub push,
prediction types and losses, and bad input (each a clear message and no output taken for a good one).

Runs use a ~10k-parameter U-Net at 8x8 and a handful of steps; most run in-process (`train(parse_args(...))`), the
ones that must be separate processes (kill, `accelerate launch`, a fresh Hub cache) run `train.py`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    TINY_UNET,
    accelerate_launch,
    assert_identical,
    checkpoint_state,
    run_python,
    run_train,
    tiny_args,
    train_cmd,
    write_image_folder,
)
from safetensors.torch import load_file

from hf_ddpm import HFDDPMPipeline
from hf_ddpm.data import digits_dataset
from hf_ddpm.training import TrainingDiverged, TrainingInputError, build_parser, main, parse_args
from hf_ddpm.training.checkpoints import list_checkpoints
from hf_ddpm.training.output import clean_interrupted_writes, save_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved_digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """36 digits written by `save_to_disk`: 5 batches of 8 per epoch, the last one short."""
    path = tmp_path_factory.mktemp("saved") / "digits36"
    digits_dataset().select(range(36)).save_to_disk(str(path))
    return path


# --- a run on each data source, loaded back by a fresh process ------------------------------------------------------

SOURCES = ("digits", "imagefolder", "saved")


@dataclass
class SourceRuns:
    """One tiny run on each data source (keyed by `SOURCES`), and what they logged."""

    outputs: dict[str, Path]
    results: dict[str, Any]
    log: str


class _LogText(logging.Handler):
    """Collects every record that reaches the root logger, formatted as caplog's `text` is (message included)."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@pytest.fixture(scope="module")
def source_runs(
    tmp_path_factory: pytest.TempPathFactory, saved_digits: Path, one_thread: None
) -> Iterator[SourceRuns]:
    """Trained once for the tests below, so that each of their checks fails on its own."""
    tmp_path = tmp_path_factory.mktemp("sources")
    folder = write_image_folder(tmp_path / "images")
    outputs = {
        "digits": tmp_path / "out-digits",
        "imagefolder": tmp_path / "out-folder",
        "saved": tmp_path / "out-saved",
    }
    handler = _LogText()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        results = {
            "digits": run_train(outputs["digits"], "--eval_steps", "2", "--save_images_steps", "2"),
            "imagefolder": run_train(
                outputs["imagefolder"], "--train_data_dir", str(folder), "--cache_dir", str(tmp_path / "c")
            ),  # fmt: skip
            "saved": run_train(outputs["saved"], "--dataset_name", str(saved_digits)),
        }
    finally:
        root.removeHandler(handler)
    yield SourceRuns(outputs, results, "\n".join(handler.lines))


@pytest.mark.parametrize("name", SOURCES)
def test_each_source_trains_the_asked_steps_into_a_pipeline(source_runs: SourceRuns, name: str) -> None:
    out, result = source_runs.outputs[name], source_runs.results[name]
    assert result.output_dir == out and result.metrics.global_step == 4
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "HFDDPMPipeline"


@pytest.mark.parametrize("name", SOURCES)
def test_each_source_writes_a_model_card_with_metadata_and_tags(source_runs: SourceRuns, name: str) -> None:
    card = (source_runs.outputs[name] / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\nlibrary_name: diffusers\n")
    for tag in ("diffusers", "unconditional-image-generation", "hf-ddpm", "ddpm"):
        assert f"\n- {tag}\n" in card


@pytest.mark.parametrize("name", SOURCES)
def test_each_source_model_card_shows_usage_steps_and_a_sample_grid(source_runs: SourceRuns, name: str) -> None:
    out = source_runs.outputs[name]
    card = (out / "README.md").read_text()
    assert "import hf_ddpm" in card and f'DiffusionPipeline.from_pretrained("{out}")' in card
    assert "| Optimizer steps | 4 |" in card and "![DDIM samples" in card
    grid = card.split("![DDIM samples (2 steps)](")[1].split(")")[0]
    assert (out / grid).is_file()


def test_periodic_grids_and_evaluations_follow_their_steps(source_runs: SourceRuns) -> None:
    # Grids of the EMA and the raw model at step 2 and 4, and evaluations at steps 0, 2, 4.
    samples = sorted(p.name for p in (source_runs.outputs["digits"] / "samples").iterdir())
    assert samples == [f"step-00000{s}-{m}.png" for s in (2, 4) for m in ("ema", "raw")]
    assert [e["step"] for e in source_runs.results["digits"].metrics.eval_history] == [0, 2, 4]


def test_a_corrupt_image_is_skipped_logged_and_counted(source_runs: SourceRuns) -> None:
    # The corrupt PNG was skipped each time it was drawn, logged by name and counted.
    result = source_runs.results["imagefolder"]
    assert result.metrics.skipped_images >= 1
    assert "skipping unreadable image" in source_runs.log and "broken.png" in source_runs.log
    assert "unreadable images were skipped in total" in source_runs.log
    metrics = json.loads((source_runs.outputs["imagefolder"] / "training_metrics.json").read_text())
    assert metrics["skipped_images"] == result.metrics.skipped_images


@pytest.mark.parametrize("name", SOURCES)
def test_each_output_loads_with_diffusers_and_samples(source_runs: SourceRuns, name: str) -> None:
    # Loaded as a user would: this module imported hf_ddpm, which registers its classes with diffusers
    # (test_push_to_hub_and_load_by_repo_id does it in a fresh process against a fresh cache).
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(source_runs.outputs[name])
    assert type(pipe).__name__ == "HFDDPMPipeline"
    assert pipe(batch_size=2, num_inference_steps=3, output_type="np").images.shape == (2, 8, 8, 1)


# --- resume ----------------------------------------------------------------------------------------------------------


def test_resume_after_sigkill_is_bit_exact(tmp_path: Path, saved_digits: Path) -> None:
    """36 rows, batch 8, 2 accumulation steps: 3 optimizer steps per epoch (the last one a single short batch), so
    resuming has to skip batches in the middle of an epoch and keep the accumulation windows aligned."""
    steps = 60
    flags = ["--dataset_name", str(saved_digits), "--gradient_accumulation_steps", "2", "--checkpointing_steps", "4",
             "--checkpoints_total_limit", "2", "--learning_rate", "3e-3"]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, *flags, steps=steps)

    proc = subprocess.Popen(train_cmd(resumed, *flags, steps=steps), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (resumed / "checkpoint-8").is_dir():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint-8 within 240 s"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = list_checkpoints(resumed)[-1][0]
    assert 8 <= killed_at < steps, f"the run was not killed in the middle (latest checkpoint {killed_at})"
    # A partial save is never taken for a checkpoint: it is skipped and cleaned up.
    (resumed / "checkpoint-9999.tmp").mkdir(exist_ok=True)

    run_train(resumed, *flags, "--resume_from_checkpoint", "latest", steps=steps)
    assert not (resumed / "checkpoint-9999.tmp").exists()
    assert [s for s, _ in list_checkpoints(resumed)] == [steps - 4, steps]
    assert_identical(checkpoint_state(straight, steps), checkpoint_state(resumed, steps))


def test_resuming_a_finished_run_keeps_its_outputs_and_metrics(tmp_path: Path) -> None:
    """What a second `make demo` does: nothing left to train, the card keeps the first run's measurements."""
    out = tmp_path / "run"
    first = run_train(out, "--checkpointing_steps", "2", "--eval_steps", "2").metrics
    again = run_train(out, "--checkpointing_steps", "2", "--eval_steps", "2", "--resume_from_checkpoint", "latest")
    m = again.metrics
    assert (m.global_step, m.final_loss, m.eval_history) == (first.global_step, first.final_loss, first.eval_history)
    assert m.train_seconds > 0 and m.images_per_second > 0  # carried over from the checkpoint
    assert f"| Final training loss | {first.final_loss:.4g} |" in (out / "README.md").read_text()


def test_checkpoint_of_another_config_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_train(out, "--checkpointing_steps", "2", steps=2)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(TrainingInputError, match=r"another config(.|\n)*scheduler\.prediction_type: "
                       r"checkpoint='epsilon', now='v_prediction'"):  # fmt: skip
        run_train(out, "--checkpointing_steps", "2", "--prediction_type", "v_prediction",
                  "--resume_from_checkpoint", "latest", steps=4)  # fmt: skip
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(TrainingInputError, match=r"already holds checkpoints of an earlier run \(checkpoint-2\)"):
        run_train(out, "--checkpointing_steps", "2", steps=4)  # a fresh run would mix its checkpoints with those
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    with pytest.raises(TrainingInputError, match="is not a complete hf_ddpm checkpoint"):
        (out / "checkpoint-3.tmp").mkdir()
        run_train(out, "--resume_from_checkpoint", str(out / "checkpoint-3.tmp"))


# --- several processes -----------------------------------------------------------------------------------------------


def test_two_processes_with_accelerate_launch(tmp_path: Path, saved_digits: Path) -> None:
    """On this CPU-only machine `--multi_gpu` gives two gloo processes (hf_ddpm passes `cpu=True` to accelerate)."""
    out = tmp_path / "ddp"
    flags = ["--dataset_name", str(saved_digits), "--checkpointing_steps", "3"]
    cmd = accelerate_launch(2) + train_cmd(out, *flags, steps=6)[1:]  # train.py and its flags, without the python
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "all 2 processes hold the same weights and EMA" in log
    assert log.count("done: 6 steps") == 1  # one process reports and writes
    checkpoint = out / "checkpoint-6"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert json.loads((out / "training_config.json").read_text())["num_processes"] == 2
    assert not list(out.glob(".*")), "temporary files left behind"
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "HFDDPMPipeline"

    # Resumed from step 3 by two processes (the checkpoint holds the DDP wrapper's `module.`-prefixed weights), the run
    # ends on the uninterrupted one's weights and EMA bit for bit.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed, ignore=shutil.ignore_patterns("checkpoint-6"))
    cmd = accelerate_launch(2) + train_cmd(resumed, *flags, "--resume_from_checkpoint", "latest", steps=6)[1:]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    for weights in ("unet/diffusion_pytorch_model.safetensors", "checkpoint-6/model.safetensors", "checkpoint-6/ema.safetensors"):  # fmt: skip
        expected, got = load_file(str(out / weights)), load_file(str(resumed / weights))
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), weights


def test_ddp_wrapper_is_freed_before_the_process_group(tmp_path: Path, saved_digits: Path) -> None:
    """Freed after `end_training`, DDP's Reducer would be the process group's last owner and free it holding the GIL,
    while a gloo worker thread may need the GIL to free its last collective's tensors: under load one exit in ~6 hung
    (CI saw it). The trainer frees the wrapper first; the probe counts wrappers alive when the group is destroyed."""
    probe = Path(__file__).parent / "ddp_teardown_probe.py"
    cmd = accelerate_launch(2) + [
        str(probe),
        *tiny_args(tmp_path / "out", "--dataset_name", str(saved_digits), steps=2),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert log.count("DDP wrappers alive at end_training: 0") == 2, log[-4000:]


# --- the Hub ---------------------------------------------------------------------------------------------------------


def test_push_to_hub_and_load_by_repo_id(hub_server, fresh_hf_cache: Path, tmp_path: Path) -> None:
    out = tmp_path / "tiny-digits"
    result = run_train(out, "--push_to_hub", "--hub_model_id", "tiny-digits-ddpm", "--checkpointing_steps", "2")
    assert result.repo_id == "user/tiny-digits-ddpm"
    from huggingface_hub import HfApi, hf_hub_download

    files = set(HfApi().list_repo_files(result.repo_id))
    assert {"model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "scheduler/scheduler_config.json", "README.md", "training_config.json"} <= files  # fmt: skip
    assert not any(f.startswith(("checkpoint-", "logs/", ".")) for f in files - {".gitattributes"})
    card = Path(hf_hub_download(result.repo_id, "README.md", cache_dir=tmp_path / "cache")).read_text()
    assert 'DiffusionPipeline.from_pretrained("user/tiny-digits-ddpm")' in card and "- hf-ddpm" in card
    assert "hf_dummy_test_token" not in (out / "training_config.json").read_text() + card

    code = """
import hf_ddpm
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained("user/tiny-digits-ddpm")
images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
print(type(pipe).__name__, images.shape)
"""
    assert run_python(code).stdout.strip().endswith("HFDDPMPipeline (1, 8, 8, 1)")
    assert any(fresh_hf_cache.iterdir()), "the fresh process did not download into the fresh cache"


# --- objectives ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
def test_each_prediction_type_trains(tmp_path: Path, prediction_type: str) -> None:
    result = run_train(
        tmp_path / "out", "--prediction_type", prediction_type, "--learning_rate", "3e-3", "--eval_steps", "40",
        "--lr_scheduler", "constant", steps=40,
    )  # fmt: skip
    first, last = result.metrics.eval_history[0], result.metrics.eval_history[-1]
    assert (first["step"], last["step"]) == (0, 40)
    assert last["eval/loss_raw"] < 0.8 * first["eval/loss_raw"], result.metrics.eval_history
    config = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == prediction_type


@pytest.mark.parametrize("loss_type", ["hybrid", "vlb"])
def test_hybrid_and_vlb_train_a_learned_variance(tmp_path: Path, loss_type: str) -> None:
    from diffusers import DiffusionPipeline

    extra = ["--snr_gamma", "5"] if loss_type == "hybrid" else []  # min-SNR weights L_simple, which vlb lacks
    result = run_train(tmp_path / "out", "--loss_type", loss_type, *extra)
    assert np.isfinite(result.metrics.final_loss)
    pipe = DiffusionPipeline.from_pretrained(tmp_path / "out")
    assert pipe.unet.config.learned_variance and pipe.scheduler.config.variance_type == "learned_range"
    assert pipe(batch_size=1, num_inference_steps=3, output_type="np").images.shape == (1, 8, 8, 1)


@pytest.mark.parametrize("loss_type", ["hybrid", "vlb"])
def test_hybrid_and_vlb_refuse_a_fixed_variance(tmp_path: Path, loss_type: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(tiny_args(tmp_path / "out", "--loss_type", loss_type, "--variance_type", "fixed_small"))
    assert exit_info.value.code == 2
    assert "needs a learned-variance U-Net" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_gradient_checkpointing_and_bf16(tmp_path: Path) -> None:
    """Gradient checkpointing recomputes the same numbers (bit-equal weights on CPU); under bf16 autocast the
    U-Net runs in bf16 while the schedule, the loss and the saved weights stay float32."""
    plain = run_train(tmp_path / "plain", "--no-use_ema", steps=2)
    checkpointed = run_train(tmp_path / "checkpointed", "--no-use_ema", "--gradient_checkpointing", steps=2)
    weights = [load_file(r.output_dir / "unet" / "diffusion_pytorch_model.safetensors") for r in (plain, checkpointed)]
    assert_identical(*weights)
    # A second precision in the same process: train() resets accelerate's per-process state.
    result = run_train(tmp_path / "bf16", "--mixed_precision", "bf16", steps=3)
    assert np.isfinite(result.metrics.final_loss)
    weights = load_file(tmp_path / "bf16" / "unet" / "diffusion_pytorch_model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(TrainingDiverged, match="NaN/inf for 10 optimizer steps in a row"):
        run_train(out, "--learning_rate", "1e30", "--lr_scheduler", "constant", "--checkpointing_steps", "1",
                  "--max_grad_norm", "0", steps=40)  # fmt: skip
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


# --- bad input -------------------------------------------------------------------------------------------------------


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    return {
        "missing dataset": (["--dataset_name", str(tmp_path / "nowhere")], "does not exist"),
        "missing column": (
            ["--image_column", "pixels"],
            r"'pixels' not found; available columns: \['image', 'label'\]",
        ),
        "empty dataset": (["--train_data_dir", str(empty), "--cache_dir", str(tmp_path / "c")], "is empty"),
        "resolution": (["--resolution", "7"], "--resolution 7 cannot be used with the U-Net preset 'tiny-16'"),
    }


@pytest.mark.parametrize("case", ["missing dataset", "missing column", "empty dataset", "resolution"])
def test_bad_input_is_refused_before_writing(tmp_path: Path, case: str) -> None:
    flags, message = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    with pytest.raises(TrainingInputError, match=message):
        run_train(out, *flags)
    assert not out.exists()


def test_foreign_output_dir_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "chapter1.tex").write_text("precious")
    with pytest.raises(TrainingInputError, match=r"is not empty and holds no hf_ddpm training run .*chapter1\.tex"):
        run_train(out)
    assert sorted(os.listdir(out)) == ["chapter1.tex"] and (out / "chapter1.tex").read_text() == "precious"


def test_cli_reports_input_errors_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`train.py`'s `main`: exit code 2 and one line naming the problem, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(tmp_path / "out", "--image_column", "pixels"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "train.py: error: image column 'pixels' not found; available columns: ['image', 'label']"
    )
    assert "Traceback" not in err and not (tmp_path / "out").exists()


def test_help_documents_every_flag_with_its_default() -> None:
    parser = build_parser()
    required = {
        "--dataset_name", "--dataset_config_name", "--train_data_dir", "--image_column", "--resolution", "--center_crop",
        "--random_flip", "--train_batch_size", "--num_epochs", "--max_train_steps", "--gradient_accumulation_steps",
        "--learning_rate", "--lr_scheduler", "--lr_warmup_steps", "--adam_beta1", "--adam_beta2",
        "--adam_weight_decay", "--adam_epsilon", "--use_ema", "--ema_inv_gamma", "--ema_power", "--ema_max_decay",
        "--mixed_precision", "--logger", "--logging_dir", "--checkpointing_steps", "--checkpoints_total_limit",
        "--resume_from_checkpoint", "--output_dir", "--push_to_hub", "--hub_model_id", "--hub_private_repo", "--seed",
        "--dataloader_num_workers", "--prediction_type", "--ddpm_num_steps", "--ddpm_beta_schedule", "--preset",
        "--variance_type", "--loss_type", "--snr_gamma", "--gradient_checkpointing", "--sample_steps",
        "--save_images_steps", "--eval_steps", "--max_grad_norm", "--channels",
    }  # fmt: skip
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert required <= {s for a in actions for s in a.option_strings}
    for action in actions:
        assert "(default:" in action.help, action.option_strings


def test_image_cache_changes_nothing_but_speed(tmp_path: Path, saved_digits: Path) -> None:
    """On by default (no workers, map-style data): a run over two epochs with random flips ends with the same
    weights bit for bit as one with `--cache_images_mb 0`; a negative budget is refused naming the flag."""
    flags = ["--dataset_name", str(saved_digits), "--random_flip", "--no-use_ema"]
    weights = {}
    for mb in ("1", "0"):
        run_train(tmp_path / mb, *flags, "--cache_images_mb", mb, steps=8)  # 5 batches an epoch
        weights[mb] = load_file(tmp_path / mb / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights["1"].keys() == weights["0"].keys()
    assert all(torch.equal(weights["1"][k], weights["0"][k]) for k in weights["0"])
    with pytest.raises(SystemExit) as exit_info:
        parse_args(tiny_args(tmp_path / "bad", "--cache_images_mb", "-1"))
    assert exit_info.value.code == 2


def test_saved_scheduler_spacing_follows_the_flag(tmp_path: Path, capsys) -> None:
    """The saved pipeline spaces few sampling steps as `--timestep_spacing` says; the default comes from the preset
    (digits: trailing, measured better for DDIM at 20 steps; ddpm-cifar10: leading, diffusers' default)."""
    from hf_ddpm.training.components import build_noise_scheduler

    run_train(tmp_path / "out", steps=2)  # the digits preset's default
    saved = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["timestep_spacing"] == "trailing"
    pipe = HFDDPMPipeline.from_pretrained(tmp_path / "out")
    pipe.scheduler.set_timesteps(20)
    assert pipe.scheduler.timesteps[0] == 999 and pipe.scheduler.timesteps[-1] == 49
    spacing = lambda *flags: build_noise_scheduler(parse_args(tiny_args(tmp_path / "b", *flags))).config  # noqa: E731
    assert spacing("--timestep_spacing", "leading").timestep_spacing == "leading"
    assert spacing("--preset", "ddpm-cifar10").timestep_spacing == "leading"
    assert spacing("--preset", "ddpm-cifar10", "--timestep_spacing", "linspace").timestep_spacing == "linspace"
    with pytest.raises(SystemExit) as exit_info:
        parse_args(tiny_args(tmp_path / "c", "--timestep_spacing", "quadratic"))
    assert exit_info.value.code == 2 and "invalid choice: 'quadratic'" in capsys.readouterr().err


def test_presets_are_defaults_that_flags_override() -> None:
    cifar = parse_args(["--preset", "ddpm-cifar10", "--learning_rate", "1e-4"])
    assert (cifar.learning_rate, cifar.lr_warmup_steps, cifar.train_batch_size, cifar.dropout) == (
        1e-4,
        5000,
        128,
        0.1,
    )
    assert (cifar.random_flip, cifar.ema_max_decay, cifar.max_grad_norm, cifar.ddpm_num_steps) == (
        True,
        0.9999,
        1.0,
        1000,
    )
    assert parse_args(["--no-use_ema"]).use_ema is False
    # digits: EMA decay s / (s + 2) at step s (weights averaged ∝ step); the cap never binds within its 2400 steps
    digits = parse_args([])
    assert (digits.ema_inv_gamma, digits.ema_power, digits.ema_max_decay) == (2.0, 1.0, 0.9999)
    assert (cifar.ema_inv_gamma, cifar.ema_power) == (1.0, 0.75)
    assert parse_args(["--ema_inv_gamma", "3"]).ema_inv_gamma == 3.0
    assert parse_args(["--num_epochs", "2"]).max_train_steps is None


@pytest.mark.parametrize("flag", ["--ema_inv_gamma", "--ema_power"])
@pytest.mark.parametrize("value", ["0", "-1"])
def test_ema_warmup_flags_must_be_positive(flag: str, value: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args([flag, value])
    assert exit_info.value.code == 2
    assert f"{flag} must be > 0, got {float(value)}." in capsys.readouterr().err


# --- writing the output folder ---------------------------------------------------------------------------------------


def test_atomic_write_replaces_whole_files_with_open_s_mode(tmp_path: Path) -> None:
    """A finished write replaces the file, with the mode `open()` gives (not mkstemp's 0o600: model cards and run
    records are read by other users and servers); a failed one keeps the old file and leaves no temporary."""
    from hf_ddpm.atomic_files import atomic_path, atomic_write

    target = tmp_path / "sub" / "card.md"
    atomic_write(target, "first")
    umask = os.umask(0o022)
    os.umask(umask)
    assert target.read_text() == "first" and target.stat().st_mode & 0o777 == 0o666 & ~umask
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("disk full")
    assert target.read_text() == "first" and sorted(os.listdir(target.parent)) == ["card.md"]


def test_pipeline_swap_recovers_from_a_crash(tmp_path: Path) -> None:
    """A crash between the two renames of a component swap leaves `.unet.old` and no `unet/`: the next run puts the
    previous complete component back; temporaries are removed."""
    from hf_ddpm import DDPMPosteriorScheduler, DDPMUNet, HFDDPMPipeline

    unet = DDPMUNet(**{**json.loads(TINY_UNET), "sample_size": 8, "in_channels": 1, "out_channels": 1})
    save_pipeline(HFDDPMPipeline(unet=unet, scheduler=DDPMPosteriorScheduler()), tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model_index.json", "scheduler", "unet"]
    os.replace(tmp_path / "unet", tmp_path / ".unet.old")
    (tmp_path / ".README.md.x1.tmp").write_text("half")
    clean_interrupted_writes(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model_index.json", "scheduler", "unet"]


def test_checkpoints_hold_no_pickled_weights(tmp_path: Path) -> None:
    out = tmp_path / "run"
    run_train(out, "--checkpointing_steps", "2", steps=2)
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "ema.safetensors").is_file() and (checkpoint / "model.safetensors").is_file()
    # accelerate always pickles the RNG states and the LR schedule's counters; no weights are among them
    assert sorted(p.name for p in checkpoint.glob("*.pkl")) == ["custom_checkpoint_0.pkl", "random_states_0.pkl"]


def test_sharded_model_modes_are_refused_with_a_pointer_to_ddp() -> None:
    """FSDP/DeepSpeed cannot start on a CPU-only machine (accelerate wants a GPU), so the check is called directly."""
    from accelerate.utils import DistributedType

    from hf_ddpm.training import TrainingInputError
    from hf_ddpm.training.launch import check_distributed_type

    for mode in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        with pytest.raises(TrainingInputError, match=rf"{mode.value} mode is not supported.*--multi_gpu"):
            check_distributed_type(mode)
    for mode in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU):
        check_distributed_type(mode)
