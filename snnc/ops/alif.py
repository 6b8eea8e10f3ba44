"""Adaptive-threshold LIF (ALIF): a LIF whose threshold rises after each spike and relaxes back.

After Bellec et al. 2018 (LSNN, "Long short-term memory and learning-to-learn in networks of
spiking neurons", eqs. 1-3, with the adaptation increment written without its (1 - rho) factor):

    a[t] = rho * a[t-1] + S[t-1]                 a[-1] = 0, S[-1] = 0   (threshold adaptation)
    b[t] = v_th + beta * a[t]                                            (adaptive threshold)
    H[t] = LIF charge of V[t-1], X[t]            (``decay`` / ``tau``, as ``snn.lif``)
    S[t] = Θ(H[t] - b[t])                        (compare ">=" or ">")
    V[t] = H[t] - b[t] * S[t]                    (reset="subtract": the threshold that was crossed)
         | H[t] * (1 - S[t]) + v_reset * S[t]    (reset="zero")

Two state variables ``(v, a)``; after step t the stored ``a`` is already ``a[t+1]``. The update is
written once, in ``update``, with plain arithmetic plus ``math.heaviside``, so the same function is the torch reference and the body of the TVM scan kernel.
This file (its op record at the bottom) is all snnc needs to run the neuron in torch, ONNX and
both TVM modes.
"""
from __future__ import annotations

import torch

from .neurons import LIF, MultiStateNeuron, TorchMath
from .registry import FORWARD, register_op, same_as_input, seq_when_multi_step


class ALIF(MultiStateNeuron, LIF):
    """Adaptive LIF; ``rho`` = decay of the adaptation, ``beta`` = threshold increase per unit of
    adaptation. Other arguments as ``LIF`` (``tau=2.0`` by default)."""

    op_name = "snn.alif"

    def __init__(self, tau=None, decay=None, rho=0.9, beta=0.2, **kw):
        super().__init__(tau=tau, decay=decay, **kw)
        if not 0.0 <= float(rho) <= 1.0:
            raise ValueError(f"ALIF: rho={rho} must lie in [0, 1]")
        if self.reset_mode == "subtract_after_leak":
            raise ValueError("ALIF: reset='subtract_after_leak' is not defined for an adaptive threshold; "
                             "use 'subtract' or 'zero'")
        if isinstance(self.v_th, torch.Tensor) and self.v_th.numel() != 1:
            raise ValueError("ALIF: v_th must be one value (the adaptation makes the threshold per neuron)")
        self.rho, self.beta = float(rho), float(beta)

    def update(self, x, state, math=TorchMath):
        """One step on ``state = (v, a)``: returns ``(spikes, (v, a))``."""
        v, a = state
        b = self.v_th + self.beta * a
        h = self.charge(v, x)
        z = h - b
        if self.surrogate is not None and math is TorchMath:
            s = self.surrogate(z, self)
        else:
            s = math.heaviside(z, self.compare == ">")
        if self.reset_mode == "subtract":
            v = h - b * s
        else:
            v = h * (1.0 - s) + self.v_reset * s
        return s, (v, self.rho * a + s)

    def initial_state(self, x):
        return (torch.full_like(x, self.v_init), torch.zeros_like(x))

    def attrs(self):
        a = super().attrs()
        return {**a, "rho": self.rho, "beta": self.beta}


register_op(ALIF, spiking="yes", state=("v", "a"), over_time="loop", accepts=seq_when_multi_step, shape=same_as_input,
            hooks={"onnx": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_neuron"})
