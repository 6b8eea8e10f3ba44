"""Spiking max pooling: what a converted SNN runs where the ANN had ``MaxPool2d``.

A rate-coded SNN cannot take the max of its inputs' *rates* by taking the max of their spikes at
each step: ``max_j s_j[t]`` (an OR of the spike trains) fires whenever any input fires, so its rate
is the rate of the union, larger than the largest rate, and the error grows with T as the trains
decorrelate. Both modes below keep a running sum of each input over time,

    S_j[t] = S_j[t-1] + X_j[t]           (S_j[-1] = 0; for spikes: the spike count so far)

and pass on, per pooling window, one value per step:

``mode="lateral"`` — lateral-inhibition pooling (LIPooling, Li et al. 2022, "Efficient and
accurate conversion of spiking neural network with burst spikes", IJCAI): each input integrates
its input, the output takes the largest integrated value and inhibits every input of the window
by what it sent. Written out, the output is the increase of the window's largest running sum,

    M[t] = max_j S_j[t],      Y[t] = M[t] - M[t-1]        (M[-1] = 0)

so ``sum_t Y[t] = max_j S_j[T]`` exactly: the time average of the output *is* the max of the
time-averaged inputs, at every T. With spike inputs ``Y[t]`` is a spike (each S_j grows by at most
one per step, so M does too).

``mode="gate"`` — Rueckauer et al. 2017 §2.4 (Frontiers in Neuroscience; Orchard 2015): a gate
lets through only the spikes of the input with the largest count so far (ties: the first),

    Y[t] = X_{j*}[t],   j* = argmax_j S_j[t]

The output count approaches the largest count as the winner settles; while it switches, the
output can miss or repeat spikes.

Single-step (``step_mode="s"``): the running sums live in ``self.sums`` (and ``self.prev``) until
``reset()``. Multi-step: ``[T, N, C, H, W] -> [T, N, C, H', W']`` with the state local.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .registry import FORWARD, register_op, seq_when_multi_step


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v), int(v))


class SpikeMaxPool2d(nn.Module):
    """Max pooling over spike trains (or currents) by running sums; see the module docstring."""

    op_name = "snn.max_pool2d"
    spiking_output = "keep"
    MODES = ("lateral", "gate")

    def __init__(self, kernel_size, stride=None, padding=0, mode="lateral", step_mode="s"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"SpikeMaxPool2d: mode={mode!r}; expected one of {self.MODES}")
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride if stride is not None else kernel_size)
        self.padding = _pair(padding)
        self.mode = mode
        self.step_mode = step_mode
        self.sums = self.prev = None

    @classmethod
    def from_max_pool(cls, pool: nn.MaxPool2d, mode: str = "lateral") -> "SpikeMaxPool2d":
        if pool.dilation not in (1, (1, 1)) or pool.ceil_mode or pool.return_indices:
            raise ValueError("SpikeMaxPool2d: only MaxPool2d without dilation, ceil_mode or return_indices "
                             f"converts; got {pool}")
        return cls(pool.kernel_size, pool.stride, pool.padding, mode=mode)

    def _pool(self, s, indices=False):
        return F.max_pool2d(s, self.kernel_size, self.stride, self.padding, return_indices=indices)

    def _step(self, x, sums, prev):
        sums = x if sums is None else sums + x
        if self.mode == "lateral":
            m = self._pool(sums)
            return (m if prev is None else m - prev), sums, m
        _, idx = self._pool(sums, indices=True)   # idx: flat H*W positions of each window's winner
        y = x.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
        return y, sums, None

    def forward(self, x):
        if self.step_mode == "m" and self.mode == "lateral":
            # all steps at once: running sums (cumsum adds in time order, as the step form does),
            # one pooling over the T*N batch, then the increase of the max
            m = self._pool(x.cumsum(0).flatten(0, 1)).unflatten(0, x.shape[:2])
            return torch.cat([m[:1], m[1:] - m[:-1]])
        if self.step_mode == "m":
            sums = prev = None
            out = []
            for t in range(x.shape[0]):
                y, sums, prev = self._step(x[t], sums, prev)
                out.append(y)
            return torch.stack(out)
        if self.sums is not None and self.sums.shape != x.shape:
            self.reset()
        y, self.sums, self.prev = self._step(x, self.sums, self.prev)
        return y

    def reset(self):
        self.sums = self.prev = None

    def attrs(self):
        k, s, p = (("x".join(map(str, v)) if v[0] != v[1] else str(v[0]))
                   for v in (self.kernel_size, self.stride, self.padding))
        return {"kernel": k, "stride": s, "pad": p, "mode": self.mode}


def _pooled_shape(mod, ins):
    """``[..., C, H, W] -> [..., C, H', W']`` (floor mode, no dilation: what from_max_pool accepts)."""
    shape, dtype = ins[0]
    (kh, kw), (sh, sw), (ph, pw) = mod.kernel_size, mod.stride, mod.padding
    h, w = shape[-2:]
    return (*shape[:-2], (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1), dtype


# loops over T itself when multi-step (running sums are its state); ONNX exports the reference
# forward; TVM lowers mode="lateral" (targets/tvm_spike_pool.py)
register_op(SpikeMaxPool2d, spiking="keep", state=("sums", "prev"), over_time="loop", accepts=seq_when_multi_step,
            shape=_pooled_shape, hooks={"onnx": FORWARD, "tvm": "snnc.targets.tvm_spike_pool:convert_spike_max_pool"})
