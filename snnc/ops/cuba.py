"""Current-based neurons: a synaptic current filter in front of a LIF membrane (NIR's ``CubaLIF``)
and its non-spiking readout (NIR's ``CubaLI``, ``LI`` and ``I``).

NIR (Pedersen et al., Nat. Commun. 2024, Table 1) writes the current-based LIF in continuous time:

    tau_syn dI/dt = -I + w_in X            tau_mem dV/dt = (v_leak - V) + r I

One forward-Euler step of length ``dt`` (the discretisation norse, snntorch and the NIR paper's
reference use), with the current updated before the membrane reads it:

    I[t] = alpha I[t-1] + gain_in X[t]                      alpha = 1 - dt/tau_syn, gain_in = w_in dt/tau_syn
    H[t] = v_leak + beta (V[t-1] - v_leak) + gain I[t]      beta  = 1 - dt/tau_mem, gain    = r dt/tau_mem
    S[t] = Θ(H[t] - v_th)                                   (compare ">" as NIR / norse / snntorch, or ">=")
    V[t] = H[t] (1 - S[t]) + v_reset S[t]                   (reset="zero": NIR, norse, snntorch reset_delay=False)
         | H[t] - v_th S[t]                                 (reset="subtract")
         | H[t], the next H subtracts v_th Θ(V[t-1] - v_th) (reset="subtract_after_leak": snntorch's default)
    I[-1] = 0, V[-1] = v_init (v_leak unless given)

norse's ``LIFCell`` is this with ``gain_in = 1`` (its input jumps the current) and
``beta = 1 - dt tau_mem_inv``, ``gain = dt tau_mem_inv``; snntorch's ``Synaptic`` with
``gain_in = gain = 1``, ``alpha``, ``beta`` as given. ``CurrentLI`` is the same without the fire
and reset: it outputs ``V[t]``. With ``alpha = 0, gain_in = 1`` it is NIR's ``LI``
(``I[t] = X[t]``); with ``beta = 1`` too, NIR's ``I`` (a pure integrator).

Both have two state variables ``(i, v)``; the update is written once, in ``update``, with plain
arithmetic and ``math.heaviside`` / ``math.select``, so it is the torch reference and, evaluated
on TIR values, the body of TVM's multi-state scan kernel (as ``snn.alif``).
"""
from __future__ import annotations

import torch

from .neurons import LIF, MultiStateNeuron, TorchMath
from .registry import FORWARD, register_op, same_as_input, seq_when_multi_step


def _unit(name, value, cls):
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{cls}: {name}={value} must lie in [0, 1]")
    return float(value)


class _TwoState(MultiStateNeuron, LIF):
    """The parameters shared by both current-based neurons; the state tuple is ``(i, v)``."""

    state_names = ("i", "v")

    def __init__(self, alpha, beta, gain_in, gain, v_leak, v_init, **kw):
        cls = type(self).__name__
        super().__init__(decay=_unit("beta", beta, cls), v_leak=v_leak,
                         v_init=float(v_leak if v_init is None else v_init), **kw)
        self.alpha, self.beta = _unit("alpha", alpha, cls), float(beta)
        self.gain_in, self.gain_mem = float(gain_in), float(gain)

    def membrane(self, i, v):
        """``H[t]`` from the new current (the LIF charge with the current as its input)."""
        if self.v_leak == 0.0:
            return self.beta * v + self.gain_mem * i
        return self.v_leak + self.beta * (v - self.v_leak) + self.gain_mem * i

    def initial_state(self, x):
        return (torch.zeros_like(x), torch.full_like(x, self.v_init))

    def two_state_attrs(self):
        a = {"alpha": self.alpha, "beta": self.beta}
        if self.gain_in != 1.0:
            a["gain_in"] = self.gain_in
        if self.gain_mem != 1.0:
            a["gain"] = self.gain_mem
        if self.v_leak != 0.0:
            a["v_leak"] = self.v_leak
        return a


class CurrentLIF(_TwoState):
    """Current-based LIF (NIR ``CubaLIF``, norse ``LIFCell``, snntorch ``Synaptic``); see the module
    docstring for the update. Defaults: NIR's reset to ``v_reset`` and strict compare."""

    op_name = "snn.current_lif"

    def __init__(self, alpha=0.5, beta=0.5, gain_in=1.0, gain=1.0, v_leak=0.0, v_th=1.0, v_reset=0.0,
                 reset="zero", compare=">", v_init=None, **kw):
        super().__init__(alpha, beta, gain_in, gain, v_leak, v_init, v_th=v_th, v_reset=v_reset,
                         reset=reset, compare=compare, **kw)

    def update(self, x, state, math=TorchMath):
        """One step on ``state = (i, v)``: returns ``(spikes, (i, v))``."""
        i, v = state
        i = self.alpha * i + self.gain_in * x
        h = self.membrane(i, v)
        strict = self.compare == ">"
        if self.reset_mode == "subtract_after_leak":   # snntorch: R[t] from V[t-1], subtracted after the leak
            h = h - self.v_th * math.heaviside(v - self.v_th, strict)
        z = h - self.v_th
        s = self.surrogate(z, self) if self.surrogate is not None and math is TorchMath else math.heaviside(z, strict)
        if self.reset_mode == "zero":
            v = h * (1.0 - s) + self.v_reset * s
        elif self.reset_mode == "subtract":
            v = h - self.v_th * s
        else:
            v = h
        return s, (i, v)

    def attrs(self):
        return {**self.two_state_attrs(), **self.common_attrs()}


class CurrentLI(_TwoState):
    """Current-based leaky integrator (NIR ``CubaLI``; ``LI`` with ``alpha=0``; ``I`` with
    ``beta=1`` too): non-spiking, outputs the membrane ``V[t]``."""

    op_name = "snn.current_li"
    spiking_output = "no"

    def __init__(self, alpha=0.0, beta=0.5, gain_in=1.0, gain=1.0, v_leak=0.0, v_init=None, **kw):
        super().__init__(alpha, beta, gain_in, gain, v_leak, v_init, **kw)

    def update(self, x, state, math=TorchMath):
        i, v = state
        i = self.alpha * i + self.gain_in * x
        v = self.membrane(i, v)
        return v, (i, v)

    def attrs(self):
        a = self.two_state_attrs()
        if self.v_init != self.v_leak:
            a["v_init"] = self.v_init
        return a


_RECORD = dict(state=("i", "v"), over_time="loop", accepts=seq_when_multi_step, shape=same_as_input)
_HOOKS = {"onnx": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_neuron", "nir_out": FORWARD}
register_op(CurrentLIF, spiking="yes", hooks=_HOOKS, **_RECORD)
register_op(CurrentLI, spiking="no", hooks=_HOOKS, **_RECORD)
