"""Write a file so that a crash or power cut leaves the old file or the new one, never half of one.

The data goes to a temporary file beside the target, is flushed to disk (fsync), and is then
renamed over the target; the folder entry is flushed too, so the rename itself survives.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_bytes(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    write_with(Path(path), lambda tmp: tmp.write_bytes(data))


def write_with(path: Path, save: Callable[[Path], object]) -> None:
    """Replace `path` atomically with what `save(temporary_path)` writes (np.save, faiss.write_index, ...)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync(path.parent)


def fsync(path: Path) -> None:
    """Flush a file's data (or a folder's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
