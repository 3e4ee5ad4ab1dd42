"""The CPU benchmarks' `--quick` modes run and print their JSON line, so the scripts the README quotes keep working.

They check that each script runs and that what it compares is comparable (equal weights, matching budgets); the
figures themselves are timings or small-sample scores and are never asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, tmp_path: Path, *flags: str) -> dict:
    """Run benchmarks/<name> --quick in a fresh process (its own HF cache) and return its last line as JSON."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / name), "--quick", "--threads", "1", *flags],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_bench_pipeline_quick(tmp_path: Path) -> None:
    result = run_benchmark("bench_pipeline.py", tmp_path, "--repeats", "1")
    assert result["max_abs_image_diff"] < 1e-3  # the two pipelines compute the same images
    for name in ("hf_ddpm", "diffusers"):
        assert result[name]["images_per_s"] > 0 and 0 <= result[name]["outside_unet_share"] < 1


@pytest.mark.slow
def test_bench_training_quick(tmp_path: Path) -> None:
    result = run_benchmark("bench_training.py", tmp_path)
    assert result["hf_ddpm_images_per_s"] > 0 and result["diffusers_images_per_s"] > 0
    assert len(result["pair_ratios"]) == 1  # --quick: one pair
    assert result["median_pair_ratio"] == result["hf_ddpm_runs"][0] / result["diffusers_runs"][0]


def test_bench_data_quick(tmp_path: Path) -> None:
    result = run_benchmark("bench_data.py", tmp_path)
    assert [len(result["ms_per_batch"][k]) for k in ("no cache", "cache")] == [2, 2]
    assert result["speedup_after_first_epoch"] > 0


def test_bench_bf16_conv_quick(tmp_path: Path) -> None:
    result = run_benchmark("bench_bf16_conv.py", tmp_path)
    assert [(r["format"], r["channels"], r["size"]) for r in result["rows"]] == [("NCHW", 256, 4), ("NHWC", 256, 4)]
    assert all(r["fp32_ms"] > 0 and r["bf16_ms"] > 0 for r in result["rows"])


@pytest.mark.slow
def test_bench_quality_quick(tmp_path: Path) -> None:
    result = run_benchmark("bench_quality.py", tmp_path, "--jobs", "2")
    assert result["seeds"] == 2 and result["floor"] > 0
    assert set(result["goals"]) >= {
        "ours / diffusers, DDPM (goal <= 0.5)",
        "best 10-step sampler / DDPM (goal <= 1.2)",
    }
    ratios = {
        f"DDIM-{n} eta={eta} / DDPM (goal <= {limit})" for n, limit in ((50, "1.10"), (20, "1.25")) for eta in (0, 1)
    }
    assert set(result["goals"]) >= ratios  # both etas of each step count the goals name (NaN here: --quick has 5/10)
    # The diffusers recipe trained for (at least) the CPU seconds ours took, and both tables are complete.
    assert result["diffusers_run"]["cpu_seconds"] >= result["cpu_seconds"] > 0
    for name in ("hf_ddpm", "diffusers"):
        rows = result[name]["samplers"]
        samplers = [row["sampler"] for row in rows]
        # DDIM η=0/1 and DPM-Solver++/UniPC at 5 and 10 steps, DDPM; analytic DDPM-5, DDIM-5/10 if calibrated
        assert samplers.count("ddim") == 4 and samplers.count("ddpm") == 1
        assert samplers.count("dpmsolver++") == samplers.count("unipc") == 2
        assert len(rows) == 9 + 3 * ("ddpm-analytic" in samplers)
        assert all(row["fid"] > 0 and 0 <= row["classes"] <= 10 for row in rows)
        # each FID is the mean of two seeds' (--quick), with its standard error
        assert all(len(row["fids"]) == 2 and row["fid"] == pytest.approx(sum(row["fids"]) / 2) for row in rows)
        assert all(row["fid_stderr"] >= 0 for row in rows)
        assert result[name]["bpd"] > 0


def test_bench_nll_steps_quick(tmp_path: Path) -> None:
    """Both K-step bounds of the bundled (calibrated) model, on the same images and noise; an uncalibrated model is
    refused with the command that calibrates it."""
    rows = run_benchmark("bench_nll_steps.py", tmp_path, "--model", str(REPO / "spaces" / "hf-ddpm" / "model"))
    assert [row["K"] for row in rows] == [2, 10]
    assert all(0 < row["analytic"] < float("inf") and 0 < row["fixed"] < float("inf") for row in rows)

    plain = tmp_path / "plain"
    shutil.copytree(REPO / "spaces" / "hf-ddpm" / "model", plain)
    config_path = plain / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config.pop("analytic_gamma")
    config_path.write_text(json.dumps(config))
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_nll_steps.py"), "--quick", "--model", str(plain)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 2 and "python -m hf_ddpm.calibrate" in proc.stderr
