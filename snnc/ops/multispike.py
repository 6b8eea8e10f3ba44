"""snn.ms_lif: sinabs' IAF / LIF family (``sinabs.layers.IAF``, ``IAFSqueeze``, ``LIF``, ``LIFSqueeze``).

Per step, in sinabs' order (``sinabs.layers.functional.lif.lif_forward_single``)::

    I[t] = alpha_syn (I[t-1] + X[t])          (with a synapse, tau_syn)  else  I[t] = X[t]
    V'   = alpha_mem V[t-1] + (1 - alpha_mem) I[t]   (norm_input)  or  alpha_mem V[t-1] + I[t]
    S[t] = (V' > 0) * trunc(V' / v_th)        spike="multi"  (MultiSpike: graded, >= 0 spikes)
         = 1[V' - v_th >= 0]                  spike="single" (SingleSpike)
    V''  = V' - S[t] * subtract               reset="subtract" (MembraneSubtract; subtract = v_th
                                                                unless a value is given)
         = V' * 1[S[t] == 0] + reset_value    reset="zero"     (MembraneReset, sinabs' formula:
                                                                reset_value is added every step)
    V[t] = relu(V'' - min_v) + min_v          (with min_v_mem)  else  V''
    V[-1] = I[-1] = 0;   IAF: alpha_mem = 1, no normalisation

Layout: sinabs is batch-first. ``time_dim=1``: input ``[N, T, ...]``; ``squeeze=(batch, steps)``
(one of them -1): input ``[N*T, ...]`` unflattened to ``[N, T, ...]`` and flattened back, as
``IAFSqueeze`` does. Spikes are float counts (``spike="multi"`` may exceed 1).
"""
from __future__ import annotations

import torch

from .neurons import StateNeuron
from .registry import FORWARD, register_op

SPIKES = ("multi", "single")
RESETS = ("subtract", "zero")


def _t(v):
    return torch.as_tensor(v, dtype=torch.float32).detach().clone()


class MultiSpikeLIF(StateNeuron):
    op_name = "snn.ms_lif"
    own_time_layout = True  # batch-first [N, T, ...] / [N*T, ...] in and out, whatever the graph layout

    def __init__(self, alpha_mem=1.0, alpha_syn=None, v_th=1.0, spike="multi", reset="subtract",
                 subtract=None, reset_value=0.0, min_v=None, norm_input=False, squeeze=None, **kw):
        if spike not in SPIKES or reset not in RESETS:
            raise ValueError(f"MultiSpikeLIF: spike={spike!r} reset={reset!r}; expected {SPIKES} and {RESETS}")
        super().__init__(reset="zero" if reset == "zero" else "subtract", step_mode="m", **kw)
        del self.v_th
        self.register_buffer("alpha_mem", _t(alpha_mem))
        self.register_buffer("v_th", _t(v_th))
        self.alpha_syn = None if alpha_syn is None else _t(alpha_syn)
        self.subtract = None if subtract is None else float(subtract)
        self.reset_value = float(reset_value)
        self.min_v = None if min_v is None else _t(min_v)
        self.spike, self.norm_input = spike, bool(norm_input)
        self.squeeze = None if squeeze is None else tuple(int(s) for s in squeeze)

    def init_state(self, x):
        return torch.zeros_like(x), torch.zeros_like(x)

    def update(self, x, state):
        v, i = state
        i = self.alpha_syn * (i + x) if self.alpha_syn is not None else x
        v = self.alpha_mem * v + ((1 - self.alpha_mem) * i if self.norm_input else i)
        if self.spike == "multi":
            s = (v > 0) * torch.div(v, self.v_th, rounding_mode="trunc").float()
        else:
            s = (v - self.v_th >= 0).float()
        if self.reset_mode == "subtract":
            v = v - s * (self.subtract if self.subtract is not None else self.v_th)
        else:
            v = v * (s == 0).float() + self.reset_value
        if self.min_v is not None:
            v = torch.nn.functional.relu(v - self.min_v) + self.min_v
        return s, (v, i), (v,)

    def forward(self, x):
        seq = x.reshape(*self.squeeze, *x.shape[1:]) if self.squeeze else x
        seq = seq.transpose(0, 1)  # [N, T, ...] -> [T, N, ...]
        out = StateNeuron.multi_step(self, seq)
        out = out.transpose(0, 1)
        return out.flatten(0, 1) if self.squeeze else out

    def steps(self, x) -> int:
        """T for an input of this op (for the graph's spec)."""
        if self.squeeze:
            return self.squeeze[1] if self.squeeze[1] > 0 else x.shape[0] // self.squeeze[0]
        return x.shape[1]

    def attrs(self):
        a = {"spike": self.spike, "alpha_mem": float(self.alpha_mem) if self.alpha_mem.numel() == 1 else "tensor"}
        if self.alpha_syn is not None:
            a["alpha_syn"] = float(self.alpha_syn)
        if self.norm_input:
            a["norm_input"] = True
        a["v_th"] = float(self.v_th) if self.v_th.numel() == 1 else "tensor"
        a["reset"] = self.reset_mode
        if self.subtract is not None:
            a["subtract"] = self.subtract
        if self.reset_mode == "zero" and self.reset_value:
            a["reset_value"] = self.reset_value
        if self.min_v is not None:
            a["min_v"] = float(self.min_v)
        a["layout"] = f"squeeze{list(self.squeeze)}" if self.squeeze else "[N,T,...]"
        return a


# op record: torch runs the forward above; ONNX traces it; TVM imports it exported (no fused scan:
# ``snnc.targets.tvm_lower._convert_exported``). No shape rule: outputs may be a tuple (output_state),
# so shapes come from running the op on fake tensors.
register_op(MultiSpikeLIF, spiking="yes", state=("v", "i"), over_time="loop", accepts=None,
            hooks={"onnx": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_exported"})
