"""Burst IF neuron: up to ``max_spikes`` spikes per time step (Li & Zeng 2022, "Efficient and
accurate conversion of spiking neural network with burst spikes", IJCAI, eq. 9-10).

A plain IF neuron emits at most one spike per step, so over T steps it can represent T + 1 rate
levels, and a membrane that holds more than one threshold's worth of charge must wait for later
steps to pass it on (the "residual" error that dominates deep converted nets at low T). A burst
neuron emits as many spikes as whole thresholds it holds, up to Γ = ``max_spikes`` (integers,
each worth the threshold, so the next layer sees count x weight):

    H[t] = V[t-1] + X[t]                              V[-1] = v_init
    S[t] = clamp(floor(H[t] / v_th), 0, Γ)            (compare ">=": H = v_th gives 1 spike;
                                                       ">": a spike needs H > k v_th for the k-th)
    V[t] = H[t] - v_th * S[t]                         (reset by subtraction)

With Γ = 1 it is the IF neuron exactly. Over T steps it represents T Γ + 1 levels, so a conversion
tuned for ``T * Γ`` levels (``threshold_balance(..., burst=Γ)``) runs in T steps. Spikes are
small integer counts, not 0/1 (the record says so: ``spiking="no"``, so no stage treats them as
binary). With a surrogate (hybrid fine-tuning) the count is the forward value and the gradient is
the surrogate's at the first threshold (a straight-through estimate).

This file (its op record at the bottom) is all snnc needs to run the neuron in torch, ONNX
(exported forward) and both TVM modes (the fused scan kernel's ``max_spikes`` rule).
"""
from __future__ import annotations

import torch

from .neurons import IF
from .registry import FORWARD, register_op, same_as_input, seq_when_multi_step


class BurstIF(IF):
    """IF neuron that fires up to ``max_spikes`` spikes per step (reset by subtraction)."""

    op_name = "snn.burst_if"

    def __init__(self, max_spikes: int = 2, **kw):
        if not isinstance(max_spikes, int) or isinstance(max_spikes, bool) or max_spikes < 1:
            raise ValueError(f"BurstIF: max_spikes={max_spikes!r} must be an int >= 1")
        if kw.get("reset", "subtract") != "subtract":
            raise ValueError(f"BurstIF: reset={kw['reset']!r}; a burst neuron resets by subtraction "
                             "(v_th per spike sent)")
        super().__init__(**kw)
        self.max_spikes = max_spikes

    def fire(self, h):
        ratio = h / self.v_th
        if self.compare == ">=":
            count = torch.floor(ratio)
        else:   # the k-th spike needs H > k v_th
            count = torch.ceil(ratio) - 1
        count = count.clamp(0, self.max_spikes)
        if self.surrogate is None:
            return count
        s = self.surrogate(h - self.v_th, self)   # gradient of the first threshold crossing
        return s + (count - s).detach()

    def attrs(self):
        return {**self.common_attrs(), "max_spikes": self.max_spikes}


register_op(BurstIF, spiking="no", state=("v",), over_time="loop", accepts=seq_when_multi_step,
            shape=same_as_input, hooks={"onnx": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_neuron"},
            refused={"tvm:int": "burst spikes are counts; quantize_integer converts IF neurons only",
                     "nir_out": "NIR has no multi-spike neuron"})
