"""snn.rlif / snn.rsynaptic: snntorch's recurrent neurons ``RLeaky`` and ``RSynaptic``.

The previous step's spikes feed back through ``V(.)``: a square ``nn.Linear`` over the features
(``all_to_all=True``) or an elementwise weight ``V`` (``all_to_all=False``), added where snntorch
adds it (``snntorch/_neurons/rleaky.py``, ``rsynaptic.py``, ``_base_state_function``)::

    RLeaky:    H[t] = (beta U[t-1] + X[t]) + V(S[t-1])
    RSynaptic: I[t] = (alpha I[t-1] + X[t]) + V(S[t-1]),   H[t] = beta U[t-1] + I[t]
    then snntorch's deferred reset, as ``snn.current_lif`` (``reset="subtract_after_leak"``:
    U[t] = H[t] - v_th Θ(U[t-1] - v_th); ``"zero_after_leak"``: U[t] = H[t] - H[t] Θ(U[t-1] - v_th);
    ``"none"``), S[t] = Θ(U[t] - v_th) strict,   S[-1] = 0 (so V's bias enters at step 0).

Both are ``snn.current_lif`` records' update with the recurrent term (``CurrentLIF.update``'s
``rec``; RLeaky keeps no current). The recurrence makes the T loop sequential through a matrix
product: tvm:llvm runs it as one TIR scan over T whose body is the matrix-vector product
(``tvm_recurrent.recurrent_scan_kernel``), torch and ONNX as the step loop below.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from .cuba import CurrentLIF
from .registry import FORWARD, register_op, seq_when_multi_step


class RSynaptic(CurrentLIF):
    op_name = "snn.rsynaptic"

    def __init__(self, alpha, beta, recurrent: nn.Linear | None = None, V=None, v_th=1.0,
                 reset="subtract_after_leak", **kw):
        super().__init__(alpha=alpha, beta=beta, v_th=v_th, reset=reset, compare=">", v_init=0.0, **kw)
        if (recurrent is None) == (V is None):
            raise ValueError(f"{type(self).__name__}: give exactly one of recurrent= (nn.Linear) or V= (elementwise)")
        self.recurrent = copy.deepcopy(recurrent) if recurrent is not None else None
        if V is not None:
            self.register_buffer("V", torch.as_tensor(V, dtype=torch.float32).detach().clone())
        else:
            self.V = None

    def recurrent_input(self, spk):
        return self.recurrent(spk) if self.recurrent is not None else spk * self.V

    def initial_state(self, x):
        return (*super().initial_state(x), torch.zeros_like(x))

    def update(self, x, state, math=None, rec=None):
        """``state = (i, v, s)``: the previous spikes are state too (they feed ``V``)."""
        i, v, s = state
        s, (i, v) = CurrentLIF.update(self, x, (i, v), rec=self.recurrent_input(s))
        return s, (i, v, s)

    state_names = ("i", "v", "s")

    def attrs(self):
        a = super().attrs()
        a["recurrent"] = f"linear{self.recurrent.out_features}" if self.recurrent is not None else "one_to_one"
        return a


class RLeaky(RSynaptic):
    op_name = "snn.rlif"

    def __init__(self, beta, **kw):
        super().__init__(0.0, beta, **kw)

    def _membrane_rec(self, i, v, x, rec):
        return self.beta * v + self.gain_in * x + rec, i

    def attrs(self):
        a = super().attrs()
        del a["alpha"]
        return a


def recurrence(m):
    """``("linear", weight, bias or None)`` or ``("elementwise", V)`` of a recurrent op."""
    if m.recurrent is not None:
        return ("linear", m.recurrent.weight, m.recurrent.bias)
    return ("elementwise", m.V)


def _scan(m) -> dict:
    """What the recurrent TVM scan needs: ``update(neuron, x, (i, v), math, rec)``, the initial
    ``(i, v)`` and the path (the previous spikes are the kernel's own previous output row)."""
    return {"neuron": m, "update": lambda n, x, state, math, rec: CurrentLIF.update(n, x, state, math, rec),
            "init": [0.0, 0.0], "path": recurrence(m)}


for _cls in (RSynaptic, RLeaky):
    register_op(_cls, spiking="yes", state=("i", "v", "s"), over_time="loop", accepts=seq_when_multi_step,
                hooks={"onnx": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_neuron", "recurrent_scan": _scan})
