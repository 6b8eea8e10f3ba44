"""Calibration for threshold_balance: checking calibration data, recording ANN activations, and
reducing them to one scale per layer (or per channel).

A *scale* lambda is the activation value that one spike per step stands for: the IF neuron that
replaces a ReLU fires at rate ~ min(a, lambda) / lambda, so lambda is the largest activation the
SNN can represent (Diehl 2015: the max; Rueckauer 2017: the p-th percentile, robust to outliers).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import fx
from tqdm.auto import tqdm

from snnc.errors import InputError, node_ref
from snnc.ir import info

ANN_METHODS = ("max", "percentile", "mse")
MAX_VALUES = 1 << 21   # activations kept per layer for percentile / mse (a uniform subsample)


def calibration_batches(calib, batch_size: int = 256) -> list[torch.Tensor]:
    """Calibration data as a list of float tensors: a tensor ``[N, ...]`` (split into batches), a
    ``Dataset`` of samples (e.g. ``snnc.data.from_spec("digits", "train")``), an ``snnc.data``
    split (its ``x_train``), or an iterable of batches, each a tensor or a ``(x, y, ...)``
    tuple/list whose first item is x."""
    if calib is None:
        raise InputError("threshold_balance: calib is None; pass calibration inputs (a tensor [N, ...] "
                         "or a DataLoader of (x, y) batches)")
    if hasattr(calib, "x_train") and hasattr(calib, "x_test"):   # an snnc.data split: its training inputs
        calib = calib.x_train
    if isinstance(calib, torch.utils.data.Dataset):             # samples, not batches: batch them
        calib = torch.utils.data.DataLoader(calib, batch_size=batch_size)
    if isinstance(calib, torch.Tensor):
        batches = list(calib.split(batch_size)) if calib.dim() > 0 else [calib]
    else:
        try:
            batches = [b[0] if isinstance(b, (tuple, list)) else b for b in calib]
        except TypeError:
            raise InputError(f"threshold_balance: calib is a {type(calib).__name__}; expected a tensor or "
                             "an iterable of batches") from None
    batches = [b for b in batches if not (isinstance(b, torch.Tensor) and b.numel() == 0)]
    if not batches:
        raise InputError("threshold_balance: the calibration data is empty (no samples)")
    for i, b in enumerate(batches):
        if not isinstance(b, torch.Tensor):
            raise InputError(f"threshold_balance: calibration batch {i} is a {type(b).__name__}, "
                             "expected a tensor (or an (x, y) tuple)")
        if not b.is_floating_point():
            raise InputError(f"threshold_balance: calibration batch {i} has dtype {b.dtype}; expected float")
        if not torch.isfinite(b).all():
            bad = int((~torch.isfinite(b)).sum())
            raise InputError(f"threshold_balance: calibration batch {i} contains {bad} NaN/inf values")
    return batches


class _Recorder(fx.Interpreter):
    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.nodes = set(nodes)
        self.seen = {}

    def run_node(self, n):
        value = super().run_node(n)
        if n in self.nodes:
            self.seen[n] = value
        return value


def _sample(values: torch.Tensor, keep: int, gen: torch.Generator) -> torch.Tensor:
    """A uniform subsample of the columns of ``values`` ``[C, M]`` (all of them if M <= keep)."""
    if values.shape[1] <= keep:
        return values
    idx = torch.randperm(values.shape[1], generator=gen)[:keep]
    return values[:, idx]


def record_activations(gm: fx.GraphModule, batches, nodes, desc="calibrating") -> dict:
    """Run the ANN graph on every batch; per node, a ``[C, M]`` float tensor of (subsampled)
    activations, channel first (C = 1st sample dim; M = samples x positions), plus the max."""
    keep = max(1, MAX_VALUES // len(batches))
    gen = torch.Generator().manual_seed(0)
    kept = {n: [] for n in nodes}
    with torch.no_grad():
        for x in tqdm(batches, desc=desc, disable=None, leave=False):
            rec = _Recorder(gm, nodes)
            rec.run(x)
            for n in nodes:
                v = rec.seen[n]
                cm = v.transpose(0, 1).reshape(v.shape[1], -1) if v.dim() > 1 else v.reshape(1, -1)
                kept[n].append(_sample(cm.float(), keep, gen))
    return {n: torch.cat(vs, dim=1) for n, vs in kept.items()}


def _positive_percentile(row: np.ndarray, q: float) -> float:
    pos = row[row > 0]   # Rueckauer 2017 (snntoolbox): percentile of the non-zero activity
    return float(np.percentile(pos, q)) if pos.size else 0.0


def _mse_threshold(row: np.ndarray, levels: int, grid: int = 64) -> float:
    """The clipping value theta minimising E[(a - q_theta(a))^2], q_theta the IF neuron's
    T-step rate code with half-threshold start: theta/L * clamp(floor(a L/theta + 0.5), 0, L)
    (Bu 2022, eq. 13 with L = T; threshold search as in Li 2021 "A free lunch from ANN")."""
    pos = row[row > 0]
    if pos.size == 0:
        return 0.0
    top = float(pos.max())
    best, best_err = top, np.inf
    for theta in np.linspace(top / grid, top, grid):
        qv = theta / levels * np.clip(np.floor(row * levels / theta + 0.5), 0, levels)
        err = float(np.mean((row - qv) ** 2))
        if err < best_err:
            best, best_err = theta, err
    return best


def reduce_scales(acts: torch.Tensor, method: str, q: float, channel_wise: bool, levels: int) -> torch.Tensor:
    """Per-channel (``[C]``) or per-layer (``[1]``) scales from ``[C, M]`` activations."""
    rows = acts.numpy() if channel_wise else acts.reshape(1, -1).numpy()
    if method == "max":
        out = [float(r.max(initial=0.0)) for r in rows]
    elif method == "percentile":
        out = [_positive_percentile(r, q) for r in rows]
    else:
        out = [_mse_threshold(r, levels) for r in rows]
    return torch.tensor(out, dtype=torch.float32)


def fill_dead(scales: torch.Tensor) -> torch.Tensor:
    """Channels that never fired in calibration get the layer's largest scale (any positive value
    is exact for them on the calibration data; the largest keeps rare activity representable)."""
    if (scales > 0).any():
        return torch.where(scales > 0, scales, scales.max())
    return torch.ones_like(scales)


def shape_scale(scales: torch.Tensor, node) -> torch.Tensor:
    """``[C]`` -> broadcastable to the node's sample shape (``[C, 1, 1]`` for conv maps); ``[1]``
    -> a 0-dim tensor."""
    if scales.numel() == 1:
        return scales.reshape(())
    sample = info(node).shape[1:]
    return scales.reshape(len(scales), *([1] * (len(sample) - 1)))


def check_scales(scales: dict) -> None:
    for n, s in scales.items():
        if not torch.isfinite(s).all():
            raise InputError(f"threshold_balance: calibration gave a non-finite scale at {node_ref(n)}")
