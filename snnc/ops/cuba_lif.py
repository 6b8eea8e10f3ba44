"""snn.cuba_lif: norse's current-based LIF (``LIFCell``) and its current-free box form (``LIFBoxCell``).

One explicit Euler step of ``dv/dt = tau_mem_inv (v_leak - v + i)``, ``di/dt = -tau_syn_inv i``,
in norse's order (``norse.torch.functional.lif.lif_feed_forward_step``)::

    I'[t] = I[t-1] + X[t]                                  (the input jumps the current first)
    Vd    = V[t-1] + dt tau_mem_inv ((v_leak - V[t-1]) + I'[t])
    I[t]  = I'[t] + (-dt tau_syn_inv) I'[t]
    S[t]  = 1[Vd - v_th > 0]                               (norse's heaviside: strict)
    V[t]  = (1 - S[t]) Vd + S[t] v_reset
    V[-1] = v_leak, I[-1] = 0

``current=False`` is ``LIFBoxCell`` (``lif_box_feed_forward_step``): no current state, the input
drives the membrane directly, ``Vd = V + dt tau_mem_inv (X + v_leak - V)``. Constants are kept
as norse keeps them (0-d float32 tensors, ``dt`` a Python float) and combined in the same order,
so spikes and voltages match norse bit for bit. ``output_state=True`` returns ``(S, V, I)``
(``(S, V)`` for the box form): what ``z, state = cell(x, state)`` reports.
"""
from __future__ import annotations

import torch

from .neurons import StateNeuron
from .registry import FORWARD, register_op, seq_when_multi_step


def _t(v):
    return torch.as_tensor(v, dtype=torch.float32).detach().clone()


class CubaLIF(StateNeuron):
    op_name = "snn.cuba_lif"

    def __init__(self, tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, v_th=1.0, v_reset=0.0, dt=0.001,
                 current=True, **kw):
        super().__init__(reset="zero", compare=">", **kw)
        del self.v_th, self.v_reset
        for name, v in (("tau_syn_inv", tau_syn_inv), ("tau_mem_inv", tau_mem_inv), ("v_leak", v_leak),
                        ("v_th", v_th), ("v_reset", v_reset)):
            self.register_buffer(name, _t(v))
        self.dt, self.current = float(dt), bool(current)

    def init_state(self, x):
        v = torch.zeros_like(x) + self.v_leak
        return (v, torch.zeros_like(x)) if self.current else (v,)

    def update(self, x, state):
        if self.current:
            v, i = state
            i_new = i + x
            v_decayed = v + self.dt * self.tau_mem_inv * ((self.v_leak - v) + i_new)
            i_decayed = i_new + (-self.dt * self.tau_syn_inv * i_new)
        else:
            (v,) = state
            v_decayed = v + self.dt * self.tau_mem_inv * (x + self.v_leak - v)
        z = (v_decayed - self.v_th > 0).to(x.dtype)
        v_new = (1 - z) * v_decayed + z * self.v_reset
        new = (v_new, i_decayed) if self.current else (v_new,)
        return z, new, new

    def attrs(self):
        a = {"dt_tau_mem_inv": self.dt * float(self.tau_mem_inv)}
        if self.current:
            a["dt_tau_syn_inv"] = self.dt * float(self.tau_syn_inv)
        if float(self.v_leak.abs().max()) != 0.0:
            a["v_leak"] = float(self.v_leak) if self.v_leak.numel() == 1 else "tensor"
        a["v_th"] = float(self.v_th) if self.v_th.numel() == 1 else "tensor"
        a["v_reset"] = float(self.v_reset) if self.v_reset.numel() == 1 else "tensor"
        if self.output_state:
            a["output_state"] = True
        return a


# op record: torch runs the forward above; ONNX traces it; TVM imports it exported (no fused scan:
# ``snnc.targets.tvm_lower._convert_exported``). No shape rule: outputs may be a tuple (output_state),
# so shapes come from running the op on fake tensors.
register_op(CubaLIF, spiking="yes", state=("v", "i"), over_time="loop", accepts=seq_when_multi_step,
            hooks={"onnx": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_exported"})
