"""spikingjelly 2.0 (``spikingjelly.activation_based``) -> snnc ops, single- and multi-step.

Neurons (spikingjelly's charge / fire / reset, which snnc's neurons follow):

    IFNode                        H = V + X                          -> snn.if
    LIFNode(tau, decay_input)     H = V + (X - (V - V_reset)) / tau  -> snn.lif {tau, decay_input,
                                  H = V - (V - V_reset) / tau + X       v_leak=V_reset}
    ParametricLIFNode(decay_input=True)
                                  H = V + (X - (V - V_reset)) k, k = sigmoid(w) -> snn.plif (w copied)
    fire: S = 1[H - v_threshold >= 0]  -> compare=">="
    reset: v_reset=None -> reset="subtract" (leak towards 0); v_reset=float -> reset="zero" with that
           v_reset, and the membrane starts at v_reset (spikingjelly's initial state) -> v_init=v_reset.

snnc's LIF evaluates ``v_leak + decay (V - v_leak) + gain X`` (decay = 1 - 1/tau) where
spikingjelly divides by tau: the same number up to float32 rounding, so spikes agree (the tests
require identical spike trains) and membranes agree to a few ulp. IF and PLIF are evaluated in
spikingjelly's own order and match bit for bit.

Layers: ``layer.Conv1d/Conv2d/Linear/BatchNorm1d/2d/AvgPool2d/MaxPool2d/AdaptiveAvgPool2d/Flatten/
Dropout`` become their torch.nn layer; in multi-step mode (``step_mode="m"``, input ``[T, N, ...]``)
they become ``time.merge -> layer -> time.split(T)`` (``T`` from the example input), as do
``SeqToANNContainer(...)`` and the stateless members of ``MultiStepContainer(...)``; neurons in
multi-step mode (or inside a ``MultiStepContainer``) become snnc neurons with ``step_mode="m"``.
Adjacent stateless layers share one merge/split pair (``frontends._fuse_time_groups``).
The surrogate gradient is not carried over (snnc ops get ``surrogate=None``: add one with
``snnc.passes.insert_surrogate``); ``detach_reset`` and ``store_v_seq`` only matter for training
and monitoring.
"""
from __future__ import annotations

import copy

from spikingjelly.activation_based import layer, neuron
from spikingjelly.activation_based.base import MemoryModule
from torch import nn

from ..ops import IF, LIF, MergeTime, ParametricLIF, SplitTime, Voting
from . import _fuse_time_groups, convert_children, convert_module, register_neuron

_NEURONS = (neuron.IFNode, neuron.LIFNode, neuron.ParametricLIFNode)


def _common(node, multi_step):
    kw = {"v_th": float(node.v_threshold), "compare": ">=", "step_mode": "m" if multi_step else "s"}
    if node.v_reset is None:
        kw["reset"] = "subtract"
    else:
        kw.update(reset="zero", v_reset=float(node.v_reset), v_init=float(node.v_reset))
    return kw


def _leak(node) -> float:
    return 0.0 if node.v_reset is None else float(node.v_reset)


def _if(node, ctx, multi_step=False):
    return IF(**_common(node, multi_step or node.step_mode == "m"))


def _lif(node, ctx, multi_step=False):
    return LIF(tau=float(node.tau), decay_input=bool(node.decay_input), v_leak=_leak(node),
               **_common(node, multi_step or node.step_mode == "m"))


def _plif(node, ctx, multi_step=False):
    if not node.decay_input:
        raise _unsupported(ctx, node, "ParametricLIFNode(decay_input=False) has no snnc form (snn.plif decays the input)")
    w = float(node.w.detach())
    m = ParametricLIF(v_leak=_leak(node), **_common(node, multi_step or node.step_mode == "m"))
    m.w.data.fill_(w)
    return m


def _unsupported(ctx, mod, reason):
    from ..errors import UnsupportedOp
    return UnsupportedOp(f"module '{ctx.path or type(mod).__name__}' (spikingjelly {type(mod).__name__}): {reason}")


def _torch_layer(mod):
    """The plain torch.nn layer that a spikingjelly stateless wrapper subclasses, same parameters."""
    base = next(c for c in type(mod).__mro__[1:] if c.__module__.startswith("torch.nn"))
    out = copy.deepcopy(mod)
    out.__class__ = base
    return out


def _over_time(layers, ctx):
    """Stateless layers applied to ``[T, N, ...]``: merge time into the batch, run, split again."""
    if ctx.T is None:
        raise _unsupported(ctx, layers[0], "multi-step layer needs the example input [T, N, ...] to know T")
    seq = nn.Sequential(MergeTime(), *layers, SplitTime(ctx.T))
    seq.step_mode = "m"  # model code may branch on it (the zoo's ``if self.avgpool.step_mode == "m"``)
    return seq


def _stateless(mod, ctx, multi_step=False):
    plain = _torch_layer(mod)
    return _over_time([plain], ctx) if multi_step or getattr(mod, "step_mode", "s") == "m" else plain


def _dropout(mod, ctx, multi_step=False):
    return nn.Dropout(mod.p).train(mod.training)  # eval: identity in both modes (spikingjelly shares the mask over T)


def _voting(mod, ctx, multi_step=False):
    # avg_pool1d(kernel=stride=voting_size) over the last dim == the mean of each group of voters
    # (any leading dims, so single- and multi-step alike); the group count comes from the input
    return Voting(voters=mod.voting_size)


def _seq_to_ann(container, ctx, multi_step=False):
    inner = [convert_module(c, ctx) for c in container]
    return _over_time(inner, ctx)


def _multi_step_container(container, ctx, multi_step=False):
    out = []
    for i, c in enumerate(container):
        conv = _CONVERT_M.get(type(c))
        if conv is not None:
            out.append(conv(c, ctx, multi_step=True))
        elif type(c) is nn.Sequential:  # a plain block inside: every member runs step by step too
            out.append(_multi_step_container(c, ctx))
        elif type(c) in (nn.Identity, nn.Dropout):
            out.append(c)
        elif type(c).__module__.startswith("torch.nn"):
            out.append(_over_time([convert_children(c, ctx)], ctx))
        else:
            raise _unsupported(ctx, c, f"member {i} of a MultiStepContainer has no multi-step snnc form")
    seq = nn.Sequential(*out)
    _fuse_time_groups(seq)
    return seq


_STATELESS = (layer.Conv1d, layer.Conv2d, layer.Linear, layer.BatchNorm1d, layer.BatchNorm2d, layer.AvgPool2d,
              layer.MaxPool2d, layer.AdaptiveAvgPool2d, layer.Flatten)
_CONVERT_M = {neuron.IFNode: _if, neuron.LIFNode: _lif, neuron.ParametricLIFNode: _plif,
              layer.VotingLayer: _voting, **{cls: _stateless for cls in _STATELESS}}

for _cls, _fn in _CONVERT_M.items():
    register_neuron(_cls, _fn)
register_neuron(layer.Dropout, _dropout)
register_neuron(layer.SeqToANNContainer, _seq_to_ann)
register_neuron(layer.MultiStepContainer, _multi_step_container)


def unsupported(mod) -> str | None:
    """Stateful spikingjelly modules without a converter cannot be traced faithfully."""
    if isinstance(mod, MemoryModule):
        return ("stateful spikingjelly module without an snnc mapping; supported: "
                + ", ".join(sorted({c.__name__ for c in _CONVERT_M} | {"Dropout", "SeqToANNContainer",
                                                                      "MultiStepContainer"})))
    return None
