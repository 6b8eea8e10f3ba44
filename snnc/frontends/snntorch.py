"""snntorch -> snnc ops.

``snn.Leaky(beta, threshold, reset_mechanism, init_hidden=True)`` keeps its membrane ``U``
without resetting it and applies the previous step's reset inside the next update (snntorch's
``reset_delay=True`` default):

    R[t]   = 1[U[t-1] - threshold > 0]                        (strict compare)
    subtract:  U[t] = beta U[t-1] + X[t] - threshold R[t]     (the reset is not decayed)
    zero:      U[t] = beta (1 - R[t]) U[t-1] + X[t]
    S[t]   = 1[U[t] - threshold > 0]

-> ``snn.lif {decay=beta, compare=">"}`` with ``reset="subtract_after_leak"`` (the membrane keeps
``U`` and the next charge subtracts ``v_th * 1[V[t-1] > v_th]`` after the leak: snntorch's order,
bit for bit) or ``reset="zero"`` (resetting right after the spike and decaying zero afterwards is
the same number as snntorch's deferred reset). Spikes and membranes match exactly.

Only the stateful-module style (``init_hidden=True``, the style of ``nn.Sequential`` snntorch
models) maps onto a per-step graph: with ``init_hidden=False`` the model's own ``forward`` threads
the membrane through ``spk, mem = lif(x, mem)``, which snnc cannot trace into a neuron op.
``Synaptic`` (two state variables: synaptic current and membrane) and the recurrent neurons have
no snnc neuron and are rejected by name.
"""
from __future__ import annotations

import snntorch as snn
import torch

from ..errors import UnsupportedOp
from ..ops import LIF
from . import register_neuron

_REASONS = {
    "Synaptic": "two state variables (synaptic current and membrane); snnc neurons have one",
    "RLeaky": "recurrent neuron (its output feeds back through a weight); snnc per-step graphs are feed-forward",
    "RSynaptic": "recurrent neuron with two state variables",
}


def _scalar(ctx, mod, name, value) -> float:
    t = torch.as_tensor(value).detach()
    if t.numel() != 1:
        raise UnsupportedOp(f"module '{ctx.path}' (snntorch Leaky): per-neuron {name} of shape {list(t.shape)}; "
                            "snnc's LIF takes one value")
    return float(t.reshape(()))


def _leaky(mod, ctx):
    where = f"module '{ctx.path or 'Leaky'}' (snntorch Leaky)"
    if not mod.init_hidden or mod.output:
        raise UnsupportedOp(f"{where}: init_hidden={mod.init_hidden}, output={mod.output}: the forward passes the "
                            "membrane in and out (spk, mem = lif(x, mem)); build it with init_hidden=True, "
                            "output=False so the state lives in the module (a per-step snnc neuron)")
    if mod.inhibition or mod.state_quant or float(mod.graded_spikes_factor) != 1.0:
        raise UnsupportedOp(f"{where}: inhibition, state_quant and graded spikes have no snnc form")
    if not mod.reset_delay:
        raise UnsupportedOp(f"{where}: reset_delay=False has no snnc form (use the default reset_delay=True)")
    resets = {"subtract": "subtract_after_leak", "zero": "zero"}
    if mod.reset_mechanism not in resets:
        raise UnsupportedOp(f"{where}: reset_mechanism={mod.reset_mechanism!r}; supported: subtract, zero")
    beta = min(max(_scalar(ctx, mod, "beta", mod.beta), 0.0), 1.0)  # snntorch clamps beta to [0, 1]
    return LIF(decay=beta, v_th=_scalar(ctx, mod, "threshold", mod.threshold),
               reset=resets[mod.reset_mechanism], compare=">")


register_neuron(snn.Leaky, _leaky)


def unsupported(mod) -> str | None:
    name = type(mod).__name__
    if name in _REASONS:
        return _REASONS[name]
    if isinstance(mod, snn.SpikingNeuron):
        return "snntorch neuron without an snnc mapping; supported: Leaky"
    return None
