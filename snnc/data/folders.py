"""Folder checks shared by the loaders: one clear error for a missing or incomplete data folder.

Loaders only read: nothing here creates, moves or deletes anything under the data folder.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import FileFormatError, InputError


def data_root(root, name: str) -> Path:
    """``root`` as an absolute path (``~`` expanded); an error naming ``name`` when it is not given."""
    if root is None or str(root) == "":
        raise InputError(f"data set {name!r} needs root=, the folder holding its files")
    return Path(os.path.expanduser(str(root))).absolute()


def incomplete(name: str, folder: Path, expected, published: str, missing=None) -> FileFormatError:
    """The error for a folder that does not hold a data set: what is expected and where to get it."""
    what = "does not exist" if not folder.exists() else (
        "is not a folder" if not folder.is_dir() else "is incomplete")
    lines = [f"{name}: data folder {folder} {what}."]
    if missing and folder.is_dir():
        shown = ", ".join(str(m) for m in list(missing)[:8]) + (" ..." if len(missing) > 8 else "")
        lines.append(f"Missing: {shown}.")
    lines.append("Expected: " + "; ".join(expected) + ".")
    lines.append(f"{name} is published at {published} (snnc never downloads; unpack it there yourself).")
    return FileFormatError(" ".join(lines))


def sorted_entries(folder: Path, files: bool, suffixes=()) -> list[Path]:
    """Sorted files (or sub-folders) of ``folder``, hidden ones skipped, filtered by suffix."""
    with os.scandir(folder) as it:
        out = [Path(e.path) for e in it if not e.name.startswith(".")
               and (e.is_file() if files else e.is_dir())
               and (not suffixes or e.name.lower().endswith(tuple(suffixes)))]
    return sorted(out)


def check_split(split: str, name: str) -> str:
    if split not in ("train", "test"):
        raise InputError(f"{name}: split must be 'train' or 'test', got {split!r}")
    return split


def check_cache_dir(cache_dir, root: Path):
    """The cache folder, refusing one inside the data folder (which snnc never writes into)."""
    if cache_dir is None:
        return None
    cache = Path(os.path.expanduser(str(cache_dir))).absolute()
    if cache == root or root in cache.parents:
        raise InputError(f"cache_dir={cache} lies inside the data folder {root}; snnc never writes "
                         "into a data folder, choose a cache folder elsewhere")
    return cache
