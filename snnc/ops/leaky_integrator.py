"""snn.li: norse's leaky integrator (``LICell``), a non-spiking readout that outputs its voltage.

One Euler step in norse's order (``norse.torch.functional.leaky_integrator.li_feed_forward_step``)::

    I'[t] = I[t-1] + X[t]
    V[t]  = V[t-1] + dt tau_mem_inv ((v_leak - V[t-1]) + I'[t])
    I[t]  = I'[t] + (-dt tau_syn_inv) I'[t]
    output V[t];   V[-1] = v_leak, I[-1] = 0

``output_state=True`` returns ``(V, V, I)`` (``v, state = li(x, state)``).
"""
from __future__ import annotations

import torch

from .neurons import StateNeuron
from .registry import FORWARD, register_op, seq_when_multi_step


def _t(v):
    return torch.as_tensor(v, dtype=torch.float32).detach().clone()


class LeakyIntegrator(StateNeuron):
    op_name = "snn.li"
    spiking_output = "no"

    def __init__(self, tau_syn_inv=200.0, tau_mem_inv=100.0, v_leak=0.0, dt=0.001, **kw):
        super().__init__(**kw)
        del self.v_th
        for name, v in (("tau_syn_inv", tau_syn_inv), ("tau_mem_inv", tau_mem_inv), ("v_leak", v_leak)):
            self.register_buffer(name, _t(v))
        self.v_th = None
        self.dt = float(dt)

    def init_state(self, x):
        return torch.zeros_like(x) + self.v_leak, torch.zeros_like(x)

    def update(self, x, state):
        v, i = state
        i_jump = i + x
        v_new = v + self.dt * self.tau_mem_inv * ((self.v_leak - v) + i_jump)
        i_decayed = i_jump + (-self.dt * self.tau_syn_inv * i_jump)
        return v_new, (v_new, i_decayed), (v_new, i_decayed)

    def attrs(self):
        a = {"dt_tau_mem_inv": self.dt * float(self.tau_mem_inv), "dt_tau_syn_inv": self.dt * float(self.tau_syn_inv)}
        if self.output_state:
            a["output_state"] = True
        return a


# op record: torch runs the forward above; ONNX traces it; TVM imports it exported (no fused scan:
# ``snnc.targets.tvm_lower._convert_exported``). No shape rule: outputs may be a tuple (output_state),
# so shapes come from running the op on fake tensors.
register_op(LeakyIntegrator, spiking="no", state=("v", "i"), over_time="loop", accepts=seq_when_multi_step,
            hooks={"onnx": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_exported"})
