"""On-disk cache of framed event tensors: one file per sample, keyed by the source file (path,
size, mtime), the sample's time window, T and the framing options, written atomically so that
DataLoader workers and interrupted runs never leave a half-written entry behind. Recordings that
hold many samples (DVS Gesture: ~11 gestures per file) also get their decoded events cached once
per file, so a shuffled first epoch decodes each file once instead of once per sample."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..fileio import atomic_write

CACHE_VERSION = 1


def cache_key(source: Path, size: int, mtime_ns: int, **options) -> str:
    ident = {"file": str(source), "size": size, "mtime_ns": mtime_ns, "version": CACHE_VERSION, **options}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def cache_load(path: Path, shape):
    """The cached frames ``shape`` float32, or None when absent or unreadable (then recomputed)."""
    if not path.exists():
        return None
    try:
        index, counts = np.load(path, allow_pickle=False)
        frames = np.zeros(int(np.prod(shape)), np.float32)
        frames[index] = counts
        return torch.from_numpy(frames.reshape(shape))
    except (OSError, ValueError, IndexError):   # a damaged entry is recomputed and replaced
        return None


def cache_store(path: Path, frames: torch.Tensor):
    # event frames are mostly zeros: store (flat index, count) of the non-zero entries as one
    # int64 [2, nnz] .npy (np.load is ~100x faster than torch.load for this)
    flat = frames.reshape(-1).numpy()
    index = np.flatnonzero(flat)
    entry = np.stack([index, flat[index].astype(np.int64)])

    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, entry, allow_pickle=False)
    atomic_write(path, write, overwrite=True)


def events_load(path: Path):
    """A cached event array (memory-mapped), or None when absent or unreadable."""
    if not path.exists():
        return None
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None


def events_store(path: Path, events: np.ndarray):
    def write(tmp):
        with open(tmp, "wb") as f:
            np.save(f, events, allow_pickle=False)
    atomic_write(path, write, overwrite=True)
