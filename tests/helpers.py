"""Small helpers shared by the tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def run_python(
    code: str, env_extra: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `code` with this interpreter in a fresh process and return the finished process.

    The child inherits this process' environment (so `HF_ENDPOINT`, `HF_HUB_CACHE`... set by conftest or by
    `monkeypatch.setenv` reach it), updated with `env_extra`. A fresh process is the only way to test what a user
    sees: nothing cached in memory by `huggingface_hub` or diffusers survives into it.

    Raises:
        AssertionError: the process exited non-zero; the message shows its stdout and stderr.
    """
    env = {**os.environ, **(env_extra or {})}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"Subprocess exited with {proc.returncode}.\n--- code ---\n{code}\n"
            f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        )
    return proc


def accelerate_launch(num_processes: int = 2) -> list[str]:
    """The start of an `accelerate launch` command line for `num_processes` processes on this machine; append the
    script and its flags. On a CPU-only machine `--multi_gpu` gives gloo processes (hf_ddpm passes `cpu=True`).
    Each launch gets a free rendezvous port: two launches on accelerate's default port (xdist workers, other jobs on
    the machine) would join each other's process group and hang."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
        "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(port),
    ]  # fmt: skip


def tiny_unet(conv_out_std: float = 0.05, **overrides):
    """A seeded 8×8 grayscale DDPMUNet small enough for CPU tests, in eval mode.

    The output conv starts at zero (as in the DDPM code); it gets N(0, conv_out_std²) weights so that the network is
    not ε ≡ 0.
    """
    import torch

    from hf_ddpm import DDPMUNet

    torch.manual_seed(0)
    config = dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_groups=8,
        dropout=0.0,
    )
    unet = DDPMUNet(**{**config, **overrides}).eval()
    torch.nn.init.normal_(unet.conv_out.weight, std=conv_out_std)
    return unet
