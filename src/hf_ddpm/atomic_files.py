"""Atomic file writes: the data goes to a temporary sibling that is renamed over the target, so a reader (or a resumed
run after a crash) sees the old file or the new one, never a torn one."""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@functools.cache
def _file_mode() -> int:
    """What `open(path, "w")` would give a new file: 0o666 less the process umask (read once; setting the umask is
    the only way to read it)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` (`.<name>.XXXX.tmp`, its folder created) to write to; it replaces `path` when
    the block succeeds and is removed when it raises. The file ends with the mode `open()` would give it, not
    mkstemp's owner-only 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (text as UTF-8) to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
