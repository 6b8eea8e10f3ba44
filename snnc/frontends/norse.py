"""norse (``norse.torch``) -> snnc ops.

    LIFCell(p, dt)      -> snn.cuba_lif            (current + membrane, norse's Euler step)
    LIFBoxCell(p, dt)   -> snn.cuba_lif {current=false}
    LICell(p, dt)       -> snn.li                  (leaky-integrator readout, outputs its voltage)
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
from ..ops import CubaLIF, LeakyIntegrator
from . import convert_module, register_neuron


def _check(mod, ctx, kind):
    if type(mod.p).__name__ == "LIFBoxParameters" and mod.p.reset_method.__name__ != "reset_value":
        raise UnsupportedOp(f"module '{ctx.path or kind}' (norse {kind}): reset_method="
                            f"{mod.p.reset_method.__name__}; supported: reset_value (the default)")


def _cell(op):
    # a cell returns (output, state): the capture stand-in keeps that signature
    return ExplicitState(op, None, pack_state=True)


def _lif(mod, ctx):
    p = mod.p
    return _cell(CubaLIF(p.tau_syn_inv, p.tau_mem_inv, p.v_leak, p.v_th, p.v_reset, dt=mod.dt, output_state=True))


def _lif_box(mod, ctx):
    _check(mod, ctx, "LIFBoxCell")
    p = mod.p
    return _cell(CubaLIF(0.0, p.tau_mem_inv, p.v_leak, p.v_th, p.v_reset, dt=mod.dt, current=False, output_state=True))


def _li(mod, ctx):
    p = mod.p
    return _cell(LeakyIntegrator(p.tau_syn_inv, p.tau_mem_inv, p.v_leak, dt=mod.dt, output_state=True))


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
