"""snn.delay: the input of ``steps`` time steps ago (NIR's ``Delay``), zeros before.

    Y[t] = X[t - d]   for t >= d,     Y[t] = 0   for t < d          (d = ``steps`` >= 0)

NIR writes ``delay`` in time units; the import divides by ``dt`` (it must be a whole number of
steps). Per-step state: the last ``d`` inputs (a FIFO); the multi-step form is a shift along T.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import FORWARD, register_op, same_as_input, seq_when_multi_step


class Delay(nn.Module):
    op_name = "snn.delay"
    spiking_output = "keep"

    def __init__(self, steps: int = 1, step_mode: str = "s"):
        super().__init__()
        if int(steps) != steps or steps < 0:
            raise ValueError(f"Delay: steps={steps!r} must be a whole number >= 0")
        self.steps, self.step_mode = int(steps), step_mode
        self.fifo = None

    def forward(self, x):
        if self.step_mode == "m":
            return self.multi_step(x)
        if self.steps == 0:
            return x
        if self.fifo is None or self.fifo[0].shape != x.shape:
            self.fifo = [torch.zeros_like(x) for _ in range(self.steps)]
        y = self.fifo.pop(0)
        self.fifo.append(x)
        return y

    def multi_step(self, x_seq):
        d = min(self.steps, x_seq.shape[0])
        if d == 0:
            return x_seq
        return torch.cat([torch.zeros_like(x_seq[:d]), x_seq[:x_seq.shape[0] - d]], dim=0)

    def reset(self):
        self.fifo = None

    def attrs(self):
        return {"steps": self.steps}


def _tvm_delay(imp, node):
    """Relax: ``concat([zeros[d], x[:T-d]], axis=0)`` on the ``[T, N, ...]`` input (no state)."""
    import numpy as np
    from tvm import relax
    mod, x, bb = imp.named_modules[node.target], imp.env[node.args[0]], imp.block_builder
    from ..ir import info
    shape, dtype = tuple(int(s) for s in info(node).shape), str(info(node).dtype).replace("torch.", "")
    d = min(mod.steps, shape[0])
    if d == 0:
        return x
    zeros = relax.const(np.zeros((d, *shape[1:]), dtype=dtype))
    head = bb.emit(relax.op.strided_slice(x, axes=[0], begin=[0], end=[shape[0] - d]))
    return bb.emit(relax.op.concat([zeros, head], axis=0))


register_op(Delay, state=("fifo",), over_time="loop", accepts=seq_when_multi_step, shape=same_as_input,
            hooks={"onnx": FORWARD, "nir_out": FORWARD, "tvm": _tvm_delay})
