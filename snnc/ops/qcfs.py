"""QCFS: the quantization-clip-floor-shift activation of Bu et al. 2022 ("Optimal ANN-SNN
conversion for high-accuracy and ultra-low-latency spiking neural networks", ICLR), trained in
the ANN in place of ReLU so that the ANN already computes what a T-step IF neuron can represent.

    y = lam / L * clamp(floor(x * L / lam + 1/2), 0, L)            (Bu 2022, eq. 13, shift = 1/2)

``lam`` (the threshold, trainable) becomes the IF threshold after conversion and the membrane
starts at lam / 2; with T = L steps the expected conversion error is zero (Bu 2022, Theorem 2).
The floor has a straight-through gradient (identity inside the clip range), and ``lam`` gets the
gradient of the clip, as in the paper's code release.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import FORWARD, register_op


class _FloorSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.floor(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class QCFS(nn.Module):
    """ReLU replacement for conversion-aware ANN training; ``L`` quantization levels."""

    op_name = "nn.qcfs"
    spiking_output = "no"

    def __init__(self, L: int = 4, threshold: float = 4.0):
        super().__init__()
        if int(L) < 1:
            raise ValueError(f"QCFS: L={L} must be a positive int")
        self.L = int(L)
        self.threshold = nn.Parameter(torch.tensor(float(threshold)))

    def forward(self, x):
        lam = self.threshold
        y = _FloorSTE.apply(torch.clamp(x / lam, 0.0, 1.0) * self.L + 0.5) / self.L
        return torch.clamp(y, 0.0, 1.0) * lam

    def attrs(self):
        return {"L": self.L, "threshold": float(self.threshold.detach())}


def use_qcfs(model: nn.Module, L: int = 4, threshold: float = 4.0) -> nn.Module:
    """Replace every ``nn.ReLU`` inside ``model`` (in place) by ``QCFS(L, threshold)``; returns it."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(model, name, QCFS(L, threshold))
        else:
            use_qcfs(child, L, threshold)
    return model


register_op(QCFS, hooks={"onnx": FORWARD})
