"""The Space's latency: from pressing Generate to the first preview and to the final images (bundled model).

    .venv/bin/python benchmarks/bench_space.py                        # starts spaces/hf-ddpm/app.py on 127.0.0.1
    .venv/bin/python benchmarks/bench_space.py --url http://127.0.0.1:7860/   # an app that is already running

Each run submits DDIM, 50 steps, 4 images (change with --steps / --images / --sampler) through gradio_client, as the
Generate button does, and notes when each streamed message arrives: the first preview (x_T, sent before any U-Net
call), the first denoised preview (step >= 1: x_t and x̂_0 after one U-Net call) and the final images. Files are
not downloaded (a browser fetches each shown image itself, in parallel). One warm-up run, then the median, min and
max of `--repeats` runs. Goals of the Space issue: first preview < 1 s, final images < 10 s.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = REPO_ROOT / "spaces" / "hf-ddpm" / "app.py"
GOALS = {"first preview": 1.0, "final images": 10.0}


@contextmanager
def started_app(timeout: float = 300) -> Iterator[str]:
    """Run the Space on 127.0.0.1 and a free port (analytics off, no SSR); yield its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "HF_DDPM_MODEL"}
    env.update(
        GRADIO_SERVER_NAME="127.0.0.1",
        GRADIO_SERVER_PORT=str(port),
        GRADIO_SSR_MODE="False",
        GRADIO_ANALYTICS_ENABLED="False",
        PYTHONUNBUFFERED="1",
    )
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen([sys.executable, str(APP)], cwd=REPO_ROOT, env=env, stdout=log, stderr=log)
        try:
            deadline = time.monotonic() + timeout
            while not (match := re.search(r"Running on local URL:\s+(\S+)", Path(log.name).read_text())):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Space did not start:\n{Path(log.name).read_text()}")
                time.sleep(0.2)
            yield match.group(1).rstrip("/") + "/"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def one_run(client, sampler: str, steps: int, images: int, seed: int) -> dict[str, float]:
    """Seconds from submit to the first preview, the first denoised preview and the final images."""
    times: dict[str, float] = {}
    start = time.perf_counter()
    job = client.submit(sampler, steps, 0.0, "leading", seed, images, 1, api_name="/generate")
    for output in job:  # the streamed messages, as they arrive
        now = time.perf_counter() - start
        status = output[0] if isinstance(output, tuple) else ""
        times.setdefault("first preview", now)
        if (match := re.match(r"\*\*step (\d+)/", status)) and int(match.group(1)) >= 1:
            times.setdefault("first denoised preview", now)
    status = job.result()[0]
    times["final images"] = time.perf_counter() - start
    if not status.startswith("**Done:**"):
        raise RuntimeError(f"unexpected final status {status!r}")
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=None, help="A running Space; default: start spaces/hf-ddpm/app.py.")
    parser.add_argument("--sampler", default="DDIM")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from gradio_client import Client

    with started_app() if args.url is None else _given(args.url) as url:
        client = Client(url, verbose=False, download_files=False)
        one_run(client, args.sampler, args.steps, args.images, seed=0)  # warm-up: first-call allocations
        runs = [one_run(client, args.sampler, args.steps, args.images, seed=k) for k in range(1, args.repeats + 1)]

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"Space latency: {args.sampler}, {args.steps} steps, {args.images} images, bundled model, {len(runs)} runs")
    print(f"CPU cores: {os.cpu_count()}, load average (1/5/15 min) after the runs: {load}")
    print(f"{'':24} {'median':>8} {'min':>8} {'max':>8}   goal")
    for key in ("first preview", "first denoised preview", "final images"):
        values = [run[key] for run in runs]
        goal = (
            f"< {GOALS[key]:.0f} s {'met' if statistics.median(values) < GOALS[key] else 'MISSED'}"
            if key in GOALS
            else ""
        )
        print(f"{key:24} {statistics.median(values):7.3f}s {min(values):7.3f}s {max(values):7.3f}s   {goal}")


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    main()
