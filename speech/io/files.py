"""Files a reader sees whole or not at all, and local files opened without ever blocking."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_whole(target: Path, data: bytes) -> None:
    """Write ``target`` under a temporary name beside it and rename it into place: a reader (or a
    later run) never finds a short file under ``target``, even if this process is killed mid-write."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_nonblocking(path: Path) -> int:
    """``path`` opened for reading without ever blocking: a FIFO swapped in for a file returns at
    once (the caller refuses what ``fstat`` says is not a regular file) instead of waiting for a
    writer that never comes. Raises what ``os.open`` raises."""
    return os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
