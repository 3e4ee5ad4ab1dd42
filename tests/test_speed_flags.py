"""Tests for the GPU speed options on CPU: bf16 autocast, `--dynamo_backend` (torch.compile), `--channels_last`,
`HFDDPMPipeline.compile_unet`, the compiler check, and `benchmarks/gpu.sh --smoke`.

None of them may change results beyond rounding: bf16 loss curves agree with fp32 within noise (by a criterion that
a differently trained run fails), channels_last and compiled runs match eager NCHW ones within float tolerance, and
compiled runs save the same weight names. One test compiles with inductor (about a minute on a cold cache; skipped
with the checker's message where the machine has no C++ compiler); the others use the aot_eager backend, which
captures the same graphs without generating code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from helpers import tiny_args, tiny_unet
from safetensors.torch import load_file

import hf_ddpm.compilation as compilation
from hf_ddpm import DDIMPosteriorScheduler, DDPMUNet, HFDDPMPipeline
from hf_ddpm.compilation import CompilerUnavailable, compile_problem
from hf_ddpm.training import TrainingInputError, build_parser, main, parse_args, train
from hf_ddpm.training.launch import dynamo_kwargs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch: pytest.MonkeyPatch):
    """One intra-op thread (see tests/test_training.py): thousands of tiny ops on a shared 2-core machine."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in [k for k in os.environ if k.startswith("ACCELERATE_DYNAMO_")]:
        monkeypatch.delenv(name)  # the runs below choose compilation by their flags alone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_with_losses(monkeypatch: pytest.MonkeyPatch, output_dir: Path, *extra: str, steps: int = 4, batch: int = 8):
    """Train, recording the loss of every optimizer step (what the tracker gets as train/loss)."""
    losses: list[float] = []

    def log(self, values, step=None, log_kwargs=None):
        if "train/loss" in values:
            losses.append(values["train/loss"])

    with monkeypatch.context() as patch:
        patch.setattr(Accelerator, "log", log)
        result = train(parse_args(tiny_args(output_dir, *extra, steps=steps, batch=batch)))
    assert len(losses) == steps
    return np.array(losses), result


def pipeline_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors")


def assert_weights_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= atol, f"weights differ by up to {worst:.3g} (tolerance {atol:.3g})"


# --- flags ------------------------------------------------------------------------------------------------------------


def test_flags_default_to_off_and_document_their_defaults() -> None:
    args = parse_args(["--output_dir", "unused"])
    assert (args.dynamo_backend, args.dynamo_mode, args.channels_last) == (None, None, None)
    assert dynamo_kwargs(args) is None  # nothing from the flags or accelerate's environment: no compilation
    actions = {a.dest: a for a in build_parser()._actions}
    for dest in ("dynamo_backend", "dynamo_mode", "channels_last"):
        assert actions[dest].help.endswith("(default: None)"), actions[dest].help
    assert parse_args(["--no-channels_last"]).channels_last is False


def test_dynamo_settings_follow_flags_then_accelerate_launch(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    # `accelerate launch --dynamo_backend inductor --dynamo_mode max-autotune` exports these.
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")
    monkeypatch.setenv("ACCELERATE_DYNAMO_MODE", "max-autotune")
    assert dynamo_kwargs(parse_args([])) == {
        "backend": "inductor", "fullgraph": False, "dynamic": None, "mode": "max-autotune"
    }  # fmt: skip
    assert dynamo_kwargs(parse_args(["--dynamo_backend", "no"])) is None  # an explicit flag wins
    assert dynamo_kwargs(parse_args(["--dynamo_backend", "aot_eager", "--dynamo_mode", "default"]))["backend"] == (
        "aot_eager"
    )
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--dynamo_backend", "aot_eager", "--dynamo_mode", "max-autotune"])
    assert exit_info.value.code == 2
    assert "--dynamo_mode max-autotune applies to --dynamo_backend inductor only" in capsys.readouterr().err


# --- no compiler: fail fast -------------------------------------------------------------------------------------------


def test_missing_compiler_fails_fast_with_a_clear_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """Decided: `--dynamo_backend inductor` without a C++ compiler stops before anything is written (a silent
    fallback to eager would hide a 2x slower run); other backends need none."""
    monkeypatch.setattr(compilation, "_cpp_compiler", lambda: None)
    out = tmp_path / "out"
    with pytest.raises(TrainingInputError, match=r"--dynamo_backend inductor: .*needs a C\+\+ compiler on CPU"):
        train(parse_args(tiny_args(out, "--dynamo_backend", "inductor")))
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        main(tiny_args(out, "--dynamo_backend", "inductor"))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("train.py: error: --dynamo_backend inductor: torch.compile's")
    assert "apt-get install g++" in err and "--dynamo_backend no" in err and "Traceback" not in err
    assert compile_problem("aot_eager", "cpu") is None

    pipe = HFDDPMPipeline(unet=tiny_unet(), scheduler=DDIMPosteriorScheduler())
    with pytest.raises(CompilerUnavailable, match="needs a C\\+\\+ compiler"):
        pipe.compile_unet()
    assert pipe.unet._compiled_call_impl is None  # left as it was

    monkeypatch.setattr(compilation, "_cpp_compiler", lambda: "g++")
    monkeypatch.setattr(compilation, "_python_headers", lambda: None)
    assert "needs the Python headers (Python.h)" in compile_problem("inductor", "cpu")
    monkeypatch.setattr(compilation, "_has_triton", lambda: False)
    assert "needs the `triton` package on CUDA GPUs" in compile_problem("inductor", "cuda")


# --- same results -----------------------------------------------------------------------------------------------------


def curves_agree(a: np.ndarray, b: np.ndarray, window: int = 10, k: float = 3.0) -> tuple[bool, list[float]]:
    """Whether two loss curves agree within noise: in every window of `window` steps the means differ by less than
    `k` standard errors of that difference (the two windows' sample variances, as if independent). Returns the
    verdict and each window's |difference| / standard error."""
    scores = []
    for start in range(0, len(a) - window + 1, window):
        x, y = a[start : start + window], b[start : start + window]
        se = np.sqrt(x.var(ddof=1) / window + y.var(ddof=1) / window)
        scores.append(float(abs(x.mean() - y.mean()) / se))
    return all(s < k for s in scores), scores


def test_bf16_loss_curve_agrees_with_fp32_within_noise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """60 steps of the same seeded run in fp32 and in bf16 autocast. The criterion can fail: a run that trains
    differently (a tenth of the learning rate, the same data and noise) fails it in every window."""
    steps, batch = 60, 16
    fp32, _ = run_with_losses(monkeypatch, tmp_path / "fp32", steps=steps, batch=batch)
    bf16, result = run_with_losses(
        monkeypatch, tmp_path / "bf16", "--mixed_precision", "bf16", steps=steps, batch=batch
    )
    slow, _ = run_with_losses(monkeypatch, tmp_path / "slow", "--learning_rate", "2e-4", steps=steps, batch=batch)

    assert fp32[-10:].mean() < 0.8 * fp32[:10].mean(), "the run must learn for the comparison to mean anything"
    assert np.abs(bf16 - fp32).max() > 0, "bf16 autocast changed nothing: was it applied?"
    agree, scores = curves_agree(fp32, bf16)
    assert agree, f"bf16 and fp32 loss curves differ beyond noise: |Δmean| / SE per window = {scores}"
    broken, broken_scores = curves_agree(fp32, slow)
    assert not broken and min(broken_scores[1:]) > 3, f"the criterion missed a different run: {broken_scores}"
    # What bf16 saves is float32, like fp32 runs.
    assert {w.dtype for w in pipeline_weights(result.output_dir).values()} == {torch.float32}


def test_channels_last_matches_contiguous(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """NHWC and NCHW memory formats run different convolution kernels on the same numbers: equal losses and weights
    up to float32 rounding (Adam normalises each update to about ±lr, so a rounding-level gradient difference can
    move a weight by up to ~lr; the tolerance is far below the ~10·lr the weights travel in 4 steps)."""
    nhwc, a = run_with_losses(monkeypatch, tmp_path / "nhwc", "--channels_last")
    nchw, b = run_with_losses(monkeypatch, tmp_path / "nchw", "--no-channels_last")
    np.testing.assert_allclose(nhwc, nchw, rtol=1e-5)
    assert_weights_close(pipeline_weights(a.output_dir), pipeline_weights(b.output_dir), atol=1e-4)
    # The default on CPU is channels_last (the U-Net's own choice there).
    default, _ = run_with_losses(monkeypatch, tmp_path / "default")
    np.testing.assert_array_equal(default, nhwc)


@pytest.mark.slow
def test_compiled_training_saves_plain_weights_and_resumes_uncompiled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The inductor run on CPU: the same losses and weights as eager within float tolerance, checkpoints and the
    pipeline without `_orig_mod.` keys, and its checkpoint resumed by a run without compilation."""
    problem = compile_problem("inductor", "cpu")
    if problem is not None:
        pytest.skip(f"inductor cannot compile on this machine: {problem}")
    flags = ("--checkpointing_steps", "2")
    eager, eager_result = run_with_losses(monkeypatch, tmp_path / "eager", *flags)
    compiled, result = run_with_losses(monkeypatch, tmp_path / "compiled", *flags, "--dynamo_backend", "inductor")
    np.testing.assert_allclose(compiled, eager, rtol=1e-5)

    names = set(DDPMUNet.from_pretrained(eager_result.output_dir / "unet").state_dict())
    raw = load_file(result.output_dir / "checkpoint-4" / "model.safetensors")
    assert set(raw) == names, "checkpoint weights are not the U-Net's own names"
    assert_weights_close(raw, load_file(eager_result.output_dir / "checkpoint-4" / "model.safetensors"), atol=1e-4)
    assert_weights_close(pipeline_weights(result.output_dir), pipeline_weights(eager_result.output_dir), atol=1e-4)

    # A copy of the compiled run, resumed from its step-2 checkpoint without compilation, ends where it ended.
    resumed = tmp_path / "resumed"
    shutil.copytree(result.output_dir, resumed)
    train(parse_args(tiny_args(resumed, *flags, "--resume_from_checkpoint", str(resumed / "checkpoint-2"))))
    assert_weights_close(load_file(resumed / "checkpoint-4" / "model.safetensors"), raw, atol=1e-4)


def test_pipeline_compile_unet_keeps_the_module_and_its_files(tmp_path: Path) -> None:
    """`compile_unet` compiles in place: same class, same saved files, the same samples (aot_eager captures the
    whole graph, `fullgraph=True` fails on any graph break; inductor's code generation is tested in training)."""
    pipe = HFDDPMPipeline(unet=tiny_unet(), scheduler=DDIMPosteriorScheduler())
    pipe.set_progress_bar_config(disable=True)

    def sample() -> torch.Tensor:
        return pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt")

    reference = sample().images
    pipe.save_pretrained(tmp_path / "plain")
    assert pipe.compile_unet(backend="aot_eager", fullgraph=True) is pipe
    assert type(pipe.unet) is DDPMUNet and pipe.unet._compiled_call_impl is not None
    torch.testing.assert_close(sample().images, reference, rtol=1e-5, atol=1e-5)
    pipe.save_pretrained(tmp_path / "compiled")
    for name in ("model_index.json", "unet/config.json"):
        assert (tmp_path / "compiled" / name).read_text() == (tmp_path / "plain" / name).read_text()
    saved = pipeline_weights(tmp_path / "compiled")
    assert saved.keys() == pipeline_weights(tmp_path / "plain").keys()
    assert not any(key.startswith("_orig_mod") for key in saved)


# --- the GPU benchmark's CPU smoke run --------------------------------------------------------------------------------


@pytest.mark.slow
def test_gpu_benchmark_smoke_run(tmp_path: Path) -> None:
    """`bash benchmarks/gpu.sh --smoke` (what CI can run): every row measured, no errors, one JSON line last."""
    env = {**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu.sh"), "--smoke"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    record = json.loads(lines[-1])
    assert record["benchmark"] == "bench_gpu" and record["smoke"] is True
    assert record["errors"] == {} and record["skipped"] == {}, (record["errors"], record["skipped"])
    assert record["max_abs_diff"] < 1e-4  # equal weights in both models
    assert set(record["train_steps_per_s"]) == {"fp32", "bf16", "bf16 + channels_last", "bf16 + compile"}
    for row in (*record["train_steps_per_s"].values(), *record["sample_seconds"].values()):
        assert set(row) == {"ours", "diffusers"} and all(v > 0 for v in row.values()), row
    assert len(record["sample_seconds"]) == 5 and set(record["tf32"]) >= {"cudnn_conv", "matmul"}
    text = "\n".join(lines[:-1])
    assert "training steps/s, batch 4" in text and "sampling 4 images, seconds" in text and "# TF32:" in text
