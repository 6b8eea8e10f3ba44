"""snn.feedback: a neuron with a recurrent path from its own output (NIR's cyclic edges).

A per-step IR graph is acyclic; a recurrent connection (NIR: ``lif -> w_rec -> lif``) carries the
previous step's output back, so it is state. ``Feedback(neuron, path)`` holds that state:

    Y[t] = neuron(X[t] + path(Y[t-1])),      Y[-1] = 0

``path`` is any stateless module (a square ``nn.Linear`` in the NIR paper's Braille graphs, NIR
``Affine``/``Linear``/``Scale``); with ``Y[-1] = 0`` an ``Affine`` path's bias enters at step 0,
as in snntorch's ``RLeaky``/``RSynaptic`` and nirtorch's executor. The multi-step form loops over
T (the recurrence is sequential through ``path``); tvm:llvm runs a ``nn.Linear`` path as one TIR scan
over T whose body is the matrix-vector product (``tvm_recurrent.recurrent_scan_kernel``), any other
path from the exported forward.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import FORWARD, register, OpRecord, seq_when_multi_step


class Feedback(nn.Module):
    op_name = "snn.feedback"

    def __init__(self, neuron: nn.Module, path: nn.Module, step_mode: str = "s"):
        super().__init__()
        if getattr(neuron, "step_mode", "s") != "s":
            raise ValueError("Feedback: the neuron must be per-step (step_mode='s')")
        self.neuron, self.path, self.step_mode = neuron, path, step_mode
        self.y = None

    @property
    def spiking_output(self):
        return getattr(type(self.neuron), "spiking_output", "yes")

    def forward(self, x):
        if self.step_mode == "m":
            return self.multi_step(x)
        if self.y is None or self.y.shape != x.shape:
            self.y = torch.zeros_like(x)
        self.y = self.neuron(x + self.path(self.y))
        return self.y

    def multi_step(self, x_seq):
        """``[T, N, ...] -> [T, N, ...]`` with the neuron's and the feedback's state kept local."""
        saved, saved_v = self.y, getattr(self.neuron, "v", None)
        self.neuron.reset()
        y, out = torch.zeros_like(x_seq[0]), []
        for t in range(x_seq.shape[0]):
            y = self.neuron(x_seq[t] + self.path(y))
            out.append(y)
        self.y, self.neuron.v = saved, saved_v
        return torch.stack(out)

    def reset(self):
        self.y = None
        if hasattr(self.neuron, "reset"):
            self.neuron.reset()

    def attrs(self):
        path = type(self.path).__name__
        if isinstance(self.path, nn.Linear):
            path = f"linear{self.path.out_features}"
        return {"neuron": type(self.neuron).op_name, "path": path, **self.neuron.attrs()}


def _scan(m) -> dict | None:
    """The recurrent TVM scan of ``neuron(X[t] + path(Y[t-1]))``: the neuron's own update on the
    summed input (``update=None``), a linear path; ``None`` for other paths."""
    if not isinstance(m.path, nn.Linear) or m.path.in_features != m.path.out_features:
        return None
    return {"neuron": m.neuron, "update": None, "init": None,
            "path": ("linear", m.path.weight, m.path.bias), "input_sum": True}


register(OpRecord(
    "snn.feedback", modules=(Feedback,), spiking=lambda m: m.spiking_output if m is not None else "yes",
    time_agnostic=True, accepts=seq_when_multi_step, state=("y",), over_time="loop",
    attrs=lambda m: m.attrs(), shape=lambda m, ins: ins[0],
    hooks={"onnx": FORWARD, "nir_out": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_neuron",
           "recurrent_scan": _scan}))
