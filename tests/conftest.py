"""Session plumbing shared by all tests: an isolated Hugging Face environment and a local Hub server.

`huggingface_hub` reads `HF_ENDPOINT` (and the cache locations) when it is first imported, so the environment is set
here, at conftest import time, before any test module imports it. Under pytest-xdist every worker imports this file
itself and so gets its own port, cache and server.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

if "huggingface_hub" in sys.modules:  # its endpoint would already point at the real Hub
    raise pytest.UsageError("huggingface_hub was imported before tests/conftest.py could set HF_ENDPOINT")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


HUB_PORT = _free_port()
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
