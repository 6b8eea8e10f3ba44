"""norse (``norse.torch``) -> snnc ops.

    LIFCell(p, dt)      -> snn.current_lif {form=euler}    (current + membrane, norse's Euler step)
    LIFBoxCell(p, dt)   -> snn.current_lif {form=euler, current=false}
    LICell(p, dt)       -> snn.current_li {form=euler}     (leaky-integrator readout, outputs its voltage)
    SequentialState(...) -> nn.Sequential of the converted members

Cells are per-step modules whose state norse threads through the caller (``z, s = cell(x, s)``):
the snnc op keeps that state itself. Inside ``SequentialState`` the state tuple never leaves the
container, so the traced graph is the per-step graph ``x[t] -> output[t]`` (norse's
``out, state = model(x[t], state)`` without the state); a model that threads the states through
its own ``for ts in range(T)`` loop is captured by ``snnc.trace`` (``snnc/capture.py``). Only the
forward (heaviside) of norse's surrogate ``method`` matters for inference; the sparse and
adjoint variants compute the same forward.
"""
from __future__ import annotations

import norse.torch as norse
from torch import nn

from ..capture import ExplicitState
from ..errors import UnsupportedOp
import torch

from ..ops import CurrentLI, CurrentLIF
from . import convert_module, register_neuron


def _check(mod, ctx, kind):
    if type(mod.p).__name__ == "LIFBoxParameters" and mod.p.reset_method.__name__ != "reset_value":
        raise UnsupportedOp(f"module '{ctx.path or kind}' (norse {kind}): reset_method="
                            f"{mod.p.reset_method.__name__}; supported: reset_value (the default)")


def _cell(op):
    # a cell returns (output, state): the capture stand-in keeps that signature
    return ExplicitState(op, None, pack_state=True)


def _scalars(mod, ctx, kind, names):
    """norse's parameters as floats (the snnc neuron takes one value per parameter here)."""
    out = {}
    for n in names:
        t = torch.as_tensor(getattr(mod.p, n)).detach().float()
        if t.numel() != 1:
            raise UnsupportedOp(f"module '{ctx.path or kind}' (norse {kind}): per-neuron {n} "
                                f"(shape {list(t.shape)}); snnc takes one value")
        out[n] = float(t.reshape(()))
    return out


def _lif(mod, ctx):
    p = _scalars(mod, ctx, "LIFCell", ("tau_syn_inv", "tau_mem_inv", "v_leak", "v_th", "v_reset"))
    return _cell(CurrentLIF.norse(p["tau_syn_inv"], p["tau_mem_inv"], p["v_leak"], dt=mod.dt, v_th=p["v_th"],
                                  v_reset=p["v_reset"], reset="zero", compare=">", report=("v", "i")))


def _lif_box(mod, ctx):
    _check(mod, ctx, "LIFBoxCell")
    p = _scalars(mod, ctx, "LIFBoxCell", ("tau_mem_inv", "v_leak", "v_th", "v_reset"))
    return _cell(CurrentLIF.norse(0.0, p["tau_mem_inv"], p["v_leak"], dt=mod.dt, current=False, v_th=p["v_th"],
                                  v_reset=p["v_reset"], reset="zero", compare=">", report=("v",)))


def _li(mod, ctx):
    p = _scalars(mod, ctx, "LICell", ("tau_syn_inv", "tau_mem_inv", "v_leak"))
    return _cell(CurrentLI.norse(p["tau_syn_inv"], p["tau_mem_inv"], p["v_leak"], dt=mod.dt, report=("v", "i")))


def _sequential_state(container, ctx):
    """The members in order; cells give their output only (their state stays in the op)."""
    import dataclasses
    out = []
    for name, child in container.named_children():
        sub = dataclasses.replace(ctx, path=f"{ctx.path}.{name}" if ctx.path else name)
        new = convert_module(child, sub)
        if isinstance(new, ExplicitState):
            new = new.op
            new.output_state = False
        out.append(new)
    return nn.Sequential(*out)


register_neuron(norse.LIFCell, _lif)
register_neuron(norse.LIFBoxCell, _lif_box)
register_neuron(norse.LICell, _li)
register_neuron(norse.SequentialState, _sequential_state)


def unsupported(mod) -> str | None:
    from norse.torch.module.snn import SNN, SNNCell, SNNRecurrent, SNNRecurrentCell
    if isinstance(mod, (SNN, SNNCell, SNNRecurrent, SNNRecurrentCell)):
        return "norse neuron without an snnc mapping; supported: LIFCell, LIFBoxCell, LICell (in SequentialState " \
               "or in a loop over time in forward)"
    return None
