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

``reset_mechanism="none"`` -> ``reset="none"``. Per-neuron ``beta`` / ``threshold`` tensors (learnable
or not) are copied as tensors (``beta`` clamped to [0, 1] as snntorch does in every step).

Every calling style maps:
  * ``init_hidden=True``: a per-step snnc neuron keeping the membrane; with ``output=True`` it
    returns ``(spk, mem)`` (``output_membrane=True``) like snntorch;
  * ``init_hidden=False`` (the tutorials' ``spk, mem = lif(cur, mem)`` loop in ``forward``): the
    neuron keeps its own membrane and the threaded one is ignored while ``snnc.trace`` captures
    the loop (``snnc/capture.py``); ``lif.init_leaky()`` still answers.
``Synaptic`` -> ``snn.current_lif`` (snntorch's decay form: ``alpha``, ``beta``, gains 1, its deferred
reset ``subtract_after_leak`` / ``zero_after_leak`` / ``none``, strict compare; ``output`` or the
explicit loop report ``(syn, mem)``); ``RLeaky`` / ``RSynaptic`` with a linear (``all_to_all=True,
linear_features=n``) or elementwise (``all_to_all=False, V=...``) recurrence -> ``snn.rlif`` /
``snn.rsynaptic`` (``snnc/ops/cuba.py``, ``snnc/ops/recurrent.py``).
"""
from __future__ import annotations

import snntorch as snn
import torch

from ..capture import ExplicitState
from ..errors import UnsupportedOp
from ..ops import LIF, CurrentLIF, RLeaky, RSynaptic
from . import register_neuron

_RESETS = {"subtract": "subtract_after_leak", "zero": "zero", "none": "none"}
# Synaptic / RLeaky / RSynaptic zero the whole step (input included) one step after the spike
_TWO_STATE_RESETS = {"subtract": "subtract_after_leak", "zero": "zero_after_leak", "none": "none"}


def _value(ctx, mod, name, value):
    """A Python float for a one-element value, else the tensor (per-neuron values)."""
    t = torch.as_tensor(value).detach().float()
    return float(t.reshape(())) if t.numel() == 1 else t.clone()


def _check(mod, ctx, kind):
    where = f"module '{ctx.path or kind}' (snntorch {kind})"
    if mod.inhibition or mod.state_quant or float(torch.as_tensor(getattr(mod, "graded_spikes_factor", 1.0))) != 1.0:
        raise UnsupportedOp(f"{where}: inhibition, state_quant and graded spikes have no snnc form")
    if not getattr(mod, "reset_delay", True):
        raise UnsupportedOp(f"{where}: reset_delay=False has no snnc form (use the default reset_delay=True)")
    if mod.reset_mechanism not in _RESETS:
        raise UnsupportedOp(f"{where}: reset_mechanism={mod.reset_mechanism!r}; supported: {', '.join(_RESETS)}")
    return where


def _styled(op, mod, data_args=1):
    """``init_hidden=True``: the op itself; ``False``: the capture-time explicit-state stand-in."""
    return op if mod.init_hidden else ExplicitState(op, mod, data_args)


def _leaky(mod, ctx):
    _check(mod, ctx, "Leaky")
    beta = _value(ctx, mod, "beta", torch.as_tensor(mod.beta).clamp(0, 1))
    op = LIF(decay=beta, v_th=_value(ctx, mod, "threshold", mod.threshold),
             reset=_RESETS[mod.reset_mechanism], compare=">",
             output_membrane=bool(mod.output) or not mod.init_hidden)
    return _styled(op, mod)


def _decays(ctx, mod):
    """alpha / beta clamped to [0, 1] as snntorch does in every step (floats, or per-neuron tensors)."""
    return {k: _value(ctx, mod, k, torch.as_tensor(getattr(mod, k)).clamp(0, 1))
            for k in ("alpha", "beta") if hasattr(mod, k)}


def _report(mod, names):
    return names if bool(mod.output) or not mod.init_hidden else None


def _synaptic(mod, ctx):
    _check(mod, ctx, "Synaptic")
    op = CurrentLIF(**_decays(ctx, mod), v_th=_value(ctx, mod, "threshold", mod.threshold),
                    reset=_TWO_STATE_RESETS[mod.reset_mechanism], compare=">", v_init=0.0,
                    report=_report(mod, ("i", "v")))
    return _styled(op, mod)


def _recurrence(mod, ctx, kind):
    if not mod.all_to_all:
        return {"V": mod.V.detach() if isinstance(mod.V, torch.Tensor) else mod.V}
    if isinstance(getattr(mod, "recurrent", None), torch.nn.Linear):
        return {"recurrent": mod.recurrent}
    raise UnsupportedOp(f"module '{ctx.path or kind}' (snntorch {kind}): a convolutional recurrence "
                        "(conv2d_channels, kernel_size) has no snnc form; supported: all_to_all with "
                        "linear_features, or all_to_all=False (one-to-one V)")


def _rleaky(mod, ctx):
    _check(mod, ctx, "RLeaky")
    op = RLeaky(_decays(ctx, mod)["beta"], v_th=_value(ctx, mod, "threshold", mod.threshold),
                reset=_TWO_STATE_RESETS[mod.reset_mechanism], report=_report(mod, ("v",)),
                **_recurrence(mod, ctx, "RLeaky"))
    return _styled(op, mod)


def _rsynaptic(mod, ctx):
    _check(mod, ctx, "RSynaptic")
    op = RSynaptic(**_decays(ctx, mod), v_th=_value(ctx, mod, "threshold", mod.threshold),
                   reset=_TWO_STATE_RESETS[mod.reset_mechanism], report=_report(mod, ("i", "v")),
                   **_recurrence(mod, ctx, "RSynaptic"))
    return _styled(op, mod)


register_neuron(snn.Leaky, _leaky)
register_neuron(snn.Synaptic, _synaptic)
register_neuron(snn.RLeaky, _rleaky)
register_neuron(snn.RSynaptic, _rsynaptic)


def unsupported(mod) -> str | None:
    if isinstance(mod, snn.SpikingNeuron):
        return "snntorch neuron without an snnc mapping; supported: Leaky, Synaptic, RLeaky, RSynaptic"
    return None
