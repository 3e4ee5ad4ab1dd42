"""Helpers shared by the test modules (fixtures shared by them are in conftest.py): processes, free ports, the tiny
U-Net and training flags, checkpoints compared bit for bit, a running Space, and the Gaussian oracle.

Nothing here imports huggingface_hub (directly or through hf_ddpm/diffusers) at import time: conftest.py imports this
module before it points `HF_ENDPOINT` at the local Hub server.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import PIL.Image
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE_DIR = REPO_ROOT / "spaces" / "hf-ddpm"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listened on a moment ago (the socket is closed when this returns)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    return [
        os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu",
        "--num_processes", str(num_processes), "--num_machines", "1", "--mixed_precision", "no",
        "--dynamo_backend", "no", "--main_process_port", str(free_port()),
    ]  # fmt: skip


def tiny_unet(conv_out_std: float = 0.05, **overrides):
    """A seeded 8×8 grayscale DDPMUNet small enough for CPU tests, in eval mode.

    The output conv starts at zero (as in the DDPM code); it gets N(0, conv_out_std²) weights so that the network is
    not ε ≡ 0.
    """
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


# --- tiny training runs --------------------------------------------------------------------------------------------

TINY_UNET = json.dumps({"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [], "num_groups": 4})


def tiny_args(output_dir: Path, *extra: str, steps: int = 4, batch: int = 8) -> list[str]:
    """Flags of a seconds-long run: 8x8 images, a ~10k-parameter U-Net, no periodic work unless asked."""
    return [
        "--output_dir", str(output_dir), "--resolution", "8", "--unet_overrides", TINY_UNET,
        "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--lr_warmup_steps", "0",
        "--sample_steps", "2", "--save_images_steps", "0", "--eval_steps", "0", "--checkpointing_steps", "0",
        "--logger", "none", *extra,
    ]  # fmt: skip


def run_train(output_dir: Path, *extra: str, steps: int = 4):
    """A tiny run in this process (`tiny_args`); returns what `hf_ddpm.training.train` returns."""
    from hf_ddpm.training import parse_args, train

    return train(parse_args(tiny_args(output_dir, *extra, steps=steps)))


def train_cmd(output_dir: Path, *extra: str, steps: int = 4) -> list[str]:
    """The command line of a tiny run of train.py in a separate process."""
    return [sys.executable, str(REPO_ROOT / "train.py"), *tiny_args(output_dir, *extra, steps=steps)]


def write_image_folder(folder: Path, count: int = 12, corrupt: bool = True) -> Path:
    """`count` digits as PNG files in a new `folder` (an imagefolder dataset), plus one corrupt PNG if asked."""
    from hf_ddpm.data import digits_dataset

    folder.mkdir(parents=True)
    for i, row in enumerate(digits_dataset().select(range(count))):
        row["image"].save(folder / f"digit_{i:02d}.png")
    if corrupt:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 8)
    return folder


def checkpoint_state(output_dir: Path, step: int) -> dict[str, object]:
    """What must match bit for bit between two runs: the raw and EMA weights and optimizer state of
    `checkpoint-{step}`, and the saved pipeline's U-Net."""
    from safetensors.torch import load_file

    checkpoint = output_dir / f"checkpoint-{step}"
    return {
        "raw": load_file(checkpoint / "model.safetensors"),
        "ema": load_file(checkpoint / "ema.safetensors"),  # EMA weights are safetensors, not a pickle
        "optimizer": torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"],
        "pipeline": load_file(output_dir / "unet" / "diffusion_pytorch_model.safetensors"),
    }


def assert_identical(a: object, b: object) -> None:
    """Nested dicts/lists/tuples of tensors and plain values equal, tensors bit for bit."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_identical(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_identical(x, y)
    elif torch.is_tensor(a):
        assert torch.equal(a, b), "tensors differ"
    else:
        assert a == b


# --- the Space -----------------------------------------------------------------------------------------------------

SPACE_STARTUP_TIMEOUT = 180  # imports alone take 10-20 s on a busy 2-core machine


@contextmanager
def running_space(
    tmp_path: Path, env: dict[str, str] | None = None, app: Path = SPACE_DIR / "app.py", python: str = sys.executable
) -> Iterator[str]:
    """Start `python spaces/hf-ddpm/app.py` (or `python app`) on 127.0.0.1 and a free port; yield its URL; stop it
    afterwards. A given `app` runs in its own folder, as on a Space.

    The URL is read from the app's own "Running on" line: Gradio silently moves to the next port if the chosen one
    was taken in between.
    """
    import httpx

    if str(SPACE_DIR) not in sys.path:
        sys.path.insert(0, str(SPACE_DIR))  # app.py imports its sibling ddpm_space, as on a Space
    from ddpm_space import MODEL_ENV

    child_env = {k: v for k, v in os.environ.items() if k != MODEL_ENV}
    child_env.update(
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(free_port()),
        GRADIO_SSR_MODE="False",
        GRADIO_ANALYTICS_ENABLED="False",
        GRADIO_TEMP_DIR=str(tmp_path / "gradio"),
        PYTHONUNBUFFERED="1",
        **(env or {}),
    )
    log_path = tmp_path / "space.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [python, str(app)],
            cwd=REPO_ROOT if app == SPACE_DIR / "app.py" else app.parent,
            env=child_env,
            stdout=log,
            stderr=log,
        )
    try:
        deadline, url = time.monotonic() + SPACE_STARTUP_TIMEOUT, None
        while url is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the Space did not start (exit code {proc.poll()}):\n{log_path.read_text()}")
            if match := re.search(r"Running on local URL:\s+(http://127\.0\.0\.1:\d+)", log_path.read_text()):
                url = match.group(1) + "/"
            else:
                time.sleep(0.5)
        assert httpx.get(url, timeout=30).status_code == 200
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- the Gaussian oracle -------------------------------------------------------------------------------------------

MEAN, STD = 0.3, 0.5  # the data law of the oracle: x_0 ~ N(MEAN, STD²), elementwise


class GaussianOracle:
    """E[ε | x_t] for x_0 ~ N(m, s²): x_t ~ N(√ᾱ m, ᾱ s² + 1 - ᾱ), so ε̂ = √(1-ᾱ) (x_t - √ᾱ m) / (ᾱ s² + 1 - ᾱ)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.alphas_cumprod = alphas_cumprod

    def __call__(self, x_t: torch.Tensor, t) -> torch.Tensor:
        if torch.is_tensor(t) and t.ndim == 1:
            alpha_bar = self.alphas_cumprod[t].reshape(-1, *([1] * (x_t.ndim - 1)))
        else:
            alpha_bar = self.alphas_cumprod[int(t)]
        return (1 - alpha_bar).sqrt() * (x_t - alpha_bar.sqrt() * MEAN) / (alpha_bar * STD**2 + 1 - alpha_bar)


def oracle_variational_bound(num_train_timesteps: int, num_samples: int = 4000) -> float:
    """E[L_T + Σ_t L_{t-1} + L_0] in nats per dimension, with the oracle's mean and fixed-small variance and a
    continuous Gaussian decoder (the data are continuous)."""
    from hf_ddpm.schedulers import DDPMPosteriorScheduler

    scheduler = DDPMPosteriorScheduler(num_train_timesteps=num_train_timesteps, scale_betas_with_timesteps=True)
    process = scheduler.diffusion
    oracle = GaussianOracle(process.alphas_cumprod)
    generator = torch.Generator().manual_seed(4)
    x0 = MEAN + STD * torch.randn(num_samples, 1, dtype=torch.float64, generator=generator)
    total = process.prior_kl(x0).mean().item()
    for t_value in range(num_train_timesteps):
        t = torch.full((num_samples,), t_value, dtype=torch.long)
        noise = torch.randn(x0.shape, dtype=torch.float64, generator=generator)
        x_t = process.q_sample(x0, t, noise)
        out = process.p_mean_variance(oracle(x_t, t), x_t, t, "epsilon", "fixed_small")
        total += process.vlb_term(x0, x_t, t, out["mean"], out["log_variance"], decoder="gaussian").mean().item()
    return total


# --- the Gaussian oracle's exact sampler laws, and the Space through gradio_client ---------------------------------


def exact_sampler_moments(alphas_cumprod: torch.Tensor, timesteps: list[int], eta: float, ddim: bool):
    """The sampler's output law, propagated exactly: every step is affine in x_t plus Gaussian noise.

    Written from the papers' formulas, independently of hf_ddpm: with a = √ᾱ_t, b = √(1-ᾱ_t), v = a²s² + b²,
    x̂_0 = m + a s² (x - a m) / v and ε̂ = b (x - a m) / v. DDPM: x' = c₀ x̂_0 + c₁ x + σ z (eq. 7, Ho); DDIM:
    x' = a' x̂_0 + √(1 - ā' - σ²) ε̂ + σ z (eq. 12, Song); σ² = η² β̃ of the pair (DDPM: η = 1, none at the end).
    """
    mean, var = 0.0, 1.0
    ab = alphas_cumprod.tolist()
    for i, t in enumerate(timesteps):
        ab_t = ab[t]
        ab_prev = ab[timesteps[i + 1]] if i + 1 < len(timesteps) else 1.0
        a, b, a_prev = math.sqrt(ab_t), math.sqrt(1 - ab_t), math.sqrt(ab_prev)
        v = ab_t * STD**2 + 1 - ab_t
        gain_x0, gain_eps = a * STD**2 / v, b / v  # d x̂_0 / dx and d ε̂ / dx
        beta = 1 - ab_t / ab_prev
        tilde_beta = (1 - ab_prev) / (1 - ab_t) * beta
        last = i + 1 == len(timesteps)
        sigma2 = 0.0 if last else eta**2 * tilde_beta
        if ddim:
            direction = math.sqrt(max(1 - ab_prev - sigma2, 0.0))
            gain = a_prev * gain_x0 + direction * gain_eps
            new_mean = a_prev * (MEAN + gain_x0 * (mean - a * MEAN)) + direction * gain_eps * (mean - a * MEAN)
        else:
            c0, c1 = a_prev * beta / (1 - ab_t), math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)
            gain = c0 * gain_x0 + c1
            new_mean = c0 * (MEAN + gain_x0 * (mean - a * MEAN)) + c1 * mean
        mean, var = new_mean, gain**2 * var + sigma2
    return mean, var


def served_image(file: dict | str) -> PIL.Image.Image:
    """A served file (gradio_client's FileData dict) or a base64 PNG data URL, as a PIL image."""
    if isinstance(file, str):
        assert file.startswith("data:image/png;base64,")
        return PIL.Image.open(io.BytesIO(base64.b64decode(file.split(",", 1)[1])))
    for attempt in range(3):  # a keep-alive connection the server just closed fails once, harmlessly
        try:
            response = httpx.get(file["url"], timeout=30)
            break
        except httpx.TransportError:
            if attempt == 2:
                raise
    assert response.status_code == 200, file
    return PIL.Image.open(io.BytesIO(response.content))


def generate_on_space(client, sampler="DDIM", steps=5, eta=0.0, spacing="leading", seed=0, num_images=4, corrector=1):
    """Submit /generate to a gradio_client `client` of the Space; returns the job."""
    return client.submit(sampler, steps, eta, spacing, seed, num_images, corrector, api_name="/generate")
