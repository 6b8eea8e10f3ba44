"""On-disk cache of framed event tensors: one file per sample, keyed by the source file (path,
size, mtime), the sample's time window, T and the framing options, written atomically so that
DataLoader workers and interrupted runs never leave a half-written entry behind."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ..fileio import atomic_write

CACHE_VERSION = 1


def cache_key(source: Path, **options) -> str:
    st = source.stat()
    ident = {"file": str(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
             "version": CACHE_VERSION, **options}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def cache_load(path: Path):
    """The cached frames, or None when absent or unreadable (then the caller recomputes)."""
    if not path.exists():
        return None
    try:
        stored = torch.load(path, weights_only=True)
    except Exception:  # a damaged cache entry is recomputed and replaced, never fatal
        return None
    return stored.to_dense().float() if stored.is_sparse else stored.float()


def cache_store(path: Path, frames: torch.Tensor):
    # event frames are mostly zeros: a COO tensor (index int64 x 4 + value int32 per entry) is
    # stored when it is smaller than the dense float32 one
    sparse = frames.to(torch.int32).to_sparse()
    stored = sparse if sparse._nnz() * (8 * frames.dim() + 4) < frames.numel() * 4 else frames
    atomic_write(path, lambda tmp: torch.save(stored, tmp), overwrite=True)
