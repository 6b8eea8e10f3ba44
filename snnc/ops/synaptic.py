"""snn.synaptic: the two-state (synaptic current + membrane) neuron of snntorch's ``Synaptic``.

Per step, with snntorch's deferred reset (``R`` comes from the previous membrane)::

    R[t]   = 1[U[t-1] - v_th > 0]
    I[t]   = alpha I[t-1] + X[t]
    U[t]   = beta U[t-1] + I[t]  - v_th R[t]        reset="subtract"
           = (beta U[t-1] + I[t]) - (beta U[t-1] + I[t]) R[t]   reset="zero" (U = 0 after a spike)
           = beta U[t-1] + I[t]                     reset="none"
    S[t]   = 1[U[t] - v_th > 0]
    I[-1] = U[-1] = 0

``alpha`` / ``beta`` / ``v_th`` are scalars or per-neuron tensors (broadcast against one sample),
kept as float32 tensors and applied in snntorch's operation order, so spikes and states match
it bit for bit. ``output_state=True`` returns ``(S, I, U)`` (snntorch's ``spk, syn, mem``).
"""
from __future__ import annotations

import torch

from .neurons import StateNeuron
from .registry import FORWARD, register_op, seq_when_multi_step


def _tensor(v):
    return torch.as_tensor(v, dtype=torch.float32).detach().clone()


class Synaptic(StateNeuron):
    op_name = "snn.synaptic"

    def __init__(self, alpha, beta, v_th=1.0, reset="subtract", **kw):
        if reset not in ("subtract", "zero", "none"):
            raise ValueError(f"Synaptic: reset={reset!r}: expected 'subtract', 'zero' or 'none'")
        super().__init__(v_th=1.0, reset=reset, compare=">", **kw)
        self.register_buffer("alpha", _tensor(alpha).clamp(0, 1))
        self.register_buffer("beta", _tensor(beta).clamp(0, 1))
        del self.v_th
        self.register_buffer("v_th", _tensor(v_th))

    def init_state(self, x):
        return torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)

    def recurrent_input(self, spk):
        return None

    def update(self, x, state):
        syn, mem, spk = state
        r = (mem - self.v_th > 0).to(x.dtype)
        syn = self.alpha * syn + x
        rec = self.recurrent_input(spk)
        if rec is not None:
            syn = syn + rec
        mem = self.beta * mem + syn
        if self.reset_mode == "subtract":
            mem = mem - r * self.v_th
        elif self.reset_mode == "zero":
            mem = mem - mem * r
        s = (mem - self.v_th > 0).to(x.dtype)
        return s, (syn, mem, s), (syn, mem)

    def attrs(self):
        def show(t):
            return float(t) if t.numel() == 1 else f"f32{list(t.shape)}"
        a = {"alpha": show(self.alpha), "beta": show(self.beta), "v_th": show(self.v_th), "reset": self.reset_mode}
        if self.output_state:
            a["output_state"] = True
        return a


# op record: torch runs the forward above; ONNX traces it; TVM imports it exported (no fused scan:
# ``snnc.targets.tvm_lower._convert_exported``). No shape rule: outputs may be a tuple (output_state),
# so shapes come from running the op on fake tensors.
register_op(Synaptic, spiking="yes", state=("syn", "mem", "spk"), over_time="loop", accepts=seq_when_multi_step,
            hooks={"onnx": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_exported"})
