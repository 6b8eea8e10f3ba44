"""Atomic, non-clobbering file writes and clear errors for unreadable files."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import FileFormatError, SnncError


class OverwriteError(SnncError, FileExistsError):
    """Refused to replace an existing file without ``overwrite=True``."""


def atomic_write(path, write, overwrite=False) -> Path:
    """Call ``write(tmp_path)`` then rename the temp file onto ``path`` (same folder, so the rename
    is atomic). An existing ``path`` is kept unless ``overwrite=True``; a failed write leaves
    nothing behind."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OverwriteError(f"{path} exists; pass overwrite=True to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def require_file(path, what="file") -> Path:
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{what} {path} does not exist")
    if path.is_dir():
        raise FileFormatError(f"{what} {path} is a directory, expected a file")
    if path.stat().st_size == 0:
        raise FileFormatError(f"{what} {path} is empty")
    return path
