"""Normalisation ops of directly trained SNNs: tdBN (Zheng 2021) and NeuNorm (Wu 2019).

``TDBatchNorm`` normalises each channel over (T, N, H, W), i.e. over the whole spatio-temporal
mini-batch, and scales the normalised value to the firing threshold (Zheng 2021, eqs. 6-7):

    x̂ = alpha * v_th * (x - μ) / sqrt(σ² + ε),    y = λ * x̂ + β        (λ = weight, β = bias)

``alpha = 1`` for a plain layer, ``1/sqrt(n)`` before an n-branch residual add. On the time-merged
layout ``[T*N, C, H, W]`` this is BatchNorm2d's statistics, so the op accepts ``[N, C, H, W]``
(per-step or time-merged) and ``[T, N, C, H, W]``; at inference (running statistics) it is a
per-channel affine map that ``fold_tdbn`` folds into the preceding convolution.

``NeuNorm`` (Wu 2019, Sec. 3.3; spikingjelly's form, which the paper's released code does not pin
down further) adds an auxiliary neuron per position that integrates the layer's spike activity
across channels and inhibits the output:

    A[t] = k * A[t-1] + (1 - k) / C² * Σ_c O[t, c]          (A[-1] = 0)
    Y[t] = O[t] - w * A[t]                                 (w: [1 or C, H, W], trainable)

It is stateful over time: single-step it keeps ``A`` until ``reset()``, multi-step it loops over T.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .registry import FORWARD, register_op, seq_when_multi_step


class TDBatchNorm(nn.Module):
    """Threshold-dependent batch norm (Zheng 2021) for conv features; see the module docstring.

    Deliberately not a ``BatchNorm2d`` subclass: a pass that folds plain BN must not mistake it
    for one (the ``alpha * v_th`` scale would be lost). Same parameters and buffers as BN."""

    op_name = "snn.tdbn"
    spiking_output = "no"

    def __init__(self, num_features, alpha=1.0, v_th=1.0, eps=1e-5, momentum=0.1):
        super().__init__()
        self.num_features = int(num_features)
        self.alpha, self.v_th = float(alpha), float(v_th)
        self.eps, self.momentum = float(eps), float(momentum)
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    @property
    def scale(self) -> float:
        return self.alpha * self.v_th

    def forward(self, x):
        if x.dim() == 5:  # [T, N, C, H, W]: statistics over (T, N, H, W) are those of the merged batch
            return self.forward(x.flatten(0, 1)).unflatten(0, x.shape[:2])
        if x.dim() != 4:
            raise ValueError(f"TDBatchNorm expects [N, C, H, W] or [T, N, C, H, W], got shape {list(x.shape)}")
        use_batch = self.training
        if use_batch:
            self.num_batches_tracked.add_(1)
        x_hat = F.batch_norm(x, self.running_mean, self.running_var, None, None, use_batch,
                             self.momentum, self.eps)
        gain = (self.weight * self.scale).view(1, -1, 1, 1)
        return torch.addcmul(self.bias.view(1, -1, 1, 1), x_hat, gain)

    def reset(self):
        pass

    def attrs(self):
        return {"alpha": self.alpha, "v_th": self.v_th, "eps": self.eps}


class NeuNorm(nn.Module):
    """Wu 2019 neuron normalisation of a spiking conv layer's output; see the module docstring."""

    op_name = "snn.neunorm"
    spiking_output = "no"
    stateful_over_time = True   # unroll_timesteps gives it the [T, N, ...] layout and step_mode "m"

    def __init__(self, channels, height, width, k=0.9, shared_across_channels=False, step_mode="s"):
        super().__init__()
        if not 0.0 <= k < 1.0:
            raise ValueError(f"NeuNorm: k={k} must lie in [0, 1)")
        self.channels, self.k = int(channels), float(k)
        self.w = nn.Parameter(torch.empty(1 if shared_across_channels else channels, height, width))
        nn.init.kaiming_uniform_(self.w, a=math.sqrt(5))
        self.step_mode = step_mode
        self.state = None

    def _step(self, o, a):
        a = self.k * a + (1.0 - self.k) / self.channels ** 2 * o.sum(dim=1, keepdim=True)
        return o - self.w * a, a

    def forward(self, x):
        if self.step_mode == "m":
            a = torch.zeros_like(x[0, :, :1])
            out = []
            for t in range(x.shape[0]):
                y, a = self._step(x[t], a)
                out.append(y)
            return torch.stack(out)
        if self.state is None or self.state.shape[0] != x.shape[0]:
            self.state = torch.zeros_like(x[:, :1])
        y, self.state = self._step(x, self.state)
        return y

    def reset(self):
        self.state = None

    def attrs(self):
        return {"k": self.k, "shared": self.w.shape[0] == 1}


register_op(TDBatchNorm, hooks={"onnx": FORWARD})
register_op(NeuNorm, state=("running",), over_time="loop", accepts=seq_when_multi_step, hooks={"onnx": FORWARD})
