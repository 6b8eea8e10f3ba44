"""snn.rlif / snn.rsynaptic: snntorch's recurrent neurons ``RLeaky`` and ``RSynaptic``.

The previous step's spikes feed back through ``V(.)``: a square ``nn.Linear`` over the features
(``all_to_all=True``) or an elementwise weight ``V`` (``all_to_all=False``)::

    RLeaky:    U[t] = beta U[t-1] + X[t] + V(S[t-1])  - reset term   (reset as snn.lif's
                                                                      subtract_after_leak / zero / none)
    RSynaptic: I[t] = alpha I[t-1] + X[t] + V(S[t-1]),  U[t] = beta U[t-1] + I[t] - reset term
    S[t] = 1[U[t] - v_th > 0],   S[-1] = 0 (so V's bias enters at step 0, as in snntorch)

Both follow snntorch's operation order (``snnc/ops/synaptic.py``); ``RLeaky`` is the synaptic
update with no current state (``alpha = 0``, which adds exactly ``0 * 0``: same numbers).
The recurrence makes the T loop sequential through a matrix product, so the multi-step form is
the step loop (tvm:llvm lowers the exported loop, no fused scan).
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .registry import FORWARD, register_op, seq_when_multi_step
from .synaptic import Synaptic, _tensor


class RSynaptic(Synaptic):
    op_name = "snn.rsynaptic"

    def __init__(self, alpha, beta, recurrent: nn.Linear | None = None, V=None, **kw):
        super().__init__(alpha, beta, **kw)
        if (recurrent is None) == (V is None):
            raise ValueError(f"{type(self).__name__}: give exactly one of recurrent= (nn.Linear) or V= (elementwise)")
        self.recurrent = copy.deepcopy(recurrent) if recurrent is not None else None
        if V is not None:
            self.register_buffer("V", _tensor(V))
        else:
            self.V = None

    def recurrent_input(self, spk):
        return self.recurrent(spk) if self.recurrent is not None else spk * self.V

    def attrs(self):
        a = super().attrs()
        a["recurrent"] = f"linear{self.recurrent.out_features}" if self.recurrent is not None else "one_to_one"
        return a


class RLeaky(RSynaptic):
    op_name = "snn.rlif"

    def __init__(self, beta, **kw):
        super().__init__(0.0, beta, **kw)

    def update(self, x, state):
        syn, mem, spk = state
        r = (mem - self.v_th > 0).to(x.dtype)
        mem = self.beta * mem + x + self.recurrent_input(spk)  # snntorch: beta*mem + input + V(spk)
        if self.reset_mode == "subtract":
            mem = mem - r * self.v_th
        elif self.reset_mode == "zero":
            mem = mem - r * mem
        s = (mem - self.v_th > 0).to(x.dtype)
        return s, (syn, mem, s), (mem,)

    def attrs(self):
        a = super().attrs()
        del a["alpha"]
        return a


# op record: torch runs the forward above; ONNX traces it; TVM imports it exported (no fused scan:
# ``snnc.targets.tvm_lower._convert_exported``). No shape rule: outputs may be a tuple (output_state),
# so shapes come from running the op on fake tensors.
for _cls in (RSynaptic, RLeaky):
    register_op(_cls, spiking="yes", state=("syn", "mem", "spk"), over_time="loop", accepts=seq_when_multi_step,
                hooks={"onnx": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_exported"})
