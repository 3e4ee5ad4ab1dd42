"""Session plumbing shared by all tests: an isolated Hugging Face environment, a local Hub server, and the fixtures
that several test modules use (importable helpers are in helpers.py).

`huggingface_hub` reads `HF_ENDPOINT` (and the cache locations) when it is first imported, so the environment is set
here, at conftest import time, before any test module imports it. Under pytest-xdist every worker imports this file
itself and so gets its own port, cache and server.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

if "huggingface_hub" in sys.modules:  # its endpoint would already point at the real Hub
    raise pytest.UsageError("huggingface_hub was imported before tests/conftest.py could set HF_ENDPOINT")


from helpers import free_port  # noqa: E402 - imports nothing that reads the environment below

HUB_PORT = free_port()
HUB_ENDPOINT = f"http://127.0.0.1:{HUB_PORT}"
_HF_HOME = tempfile.mkdtemp(prefix="hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

os.environ.update(
    {
        "HF_ENDPOINT": HUB_ENDPOINT,
        # With hf_xet installed the client would upload large files through Xet, which the local server cannot serve.
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": "hf_dummy_test_token",
        "HF_HOME": _HF_HOME,
        "HF_HUB_CACHE": os.path.join(_HF_HOME, "hub"),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "DO_NOT_TRACK": "1",
    }
)
os.environ.pop("HF_HUB_OFFLINE", None)

import torch  # noqa: E402
from hub_server import HubServer  # noqa: E402 - needs nothing from the environment, but keep all imports after it


@pytest.fixture(scope="session")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    """The local Hub server that `HF_ENDPOINT` points at, shared by the whole session (of one xdist worker)."""
    with HubServer(tmp_path_factory.mktemp("hub"), port=HUB_PORT) as server:
        yield server


@pytest.fixture
def fresh_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point `HF_HUB_CACHE`/`HF_HOME` at an empty folder for this test; returns the hub cache folder.

    Subprocesses started afterwards (see `helpers.run_python`) inherit it. In this process, `huggingface_hub` already
    read its constants at import time: they are patched too, which covers the calls that read them at call time.
    """
    home = tmp_path / "hf_home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    if (constants := sys.modules.get("huggingface_hub.constants")) is not None:
        monkeypatch.setattr(constants, "HF_HOME", str(home))
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread, here and in child processes, for every test of a module that asks for it (with
    `pytestmark = pytest.mark.usefixtures("one_thread")`): training runs are thousands of tiny ops, and with two
    OpenMP threads on a busy 2-core machine every op waits at a barrier for a descheduled thread (20x slower).
    Module-scoped so that module-scoped runs (fixtures that train once for several tests) get it too."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        yield
        torch.set_num_threads(threads)
