"""insert_surrogate: give every spiking neuron a surrogate gradient, so the graph trains.

Assumes: a spiking-IR graph (per-step or unrolled) whose neurons are ``snnc.ops.Neuron``s.
Guarantees: the forward is unchanged, bit for bit (the surrogate's forward is the neuron's own
Heaviside, ``snnc.ops.surrogate.heaviside``); only the backward of ``Θ`` changes, to the
surrogate of ``kind`` (``rectangular`` Wu 2019; ``sigmoid``; ``atan`` Fang 2021; ``triangle`` and
``stdb`` Rathi 2020; ``dsr`` Meng 2022, multi-step graphs only). Each neuron gets its own
surrogate instance (STDB keeps per-neuron spike times). ``kind=None`` removes the surrogates
(back to the inference graph). Neurons with a built-in backward (``snnc.ops.dsr`` neurons) are
left alone. The dump shows the choice: ``snn.lif(%2) {..., surrogate=atan(alpha=2)}``.
The input graph is not modified.
"""
from __future__ import annotations

import copy

from torch import fx

from snnc.errors import SnncError
from snnc.ir import annotate, graph_spec
from snnc.ops import Neuron
from snnc.ops.neuron_scan import linear_charge
from snnc.ops.spike_store import compact_spikes
from snnc.ops.surrogate import SURROGATES, make_surrogate


def insert_surrogate(gm: fx.GraphModule, kind: str | None = "atan", **params) -> fx.GraphModule:
    """Return a copy of ``gm`` whose neurons backpropagate through surrogate ``kind``.

    ``params`` override the kind's defaults (``rectangular: a``, ``sigmoid/atan: alpha``,
    ``triangle: gamma``, ``stdb: alpha, beta``)."""
    if kind is not None and kind not in SURROGATES:
        raise SnncError(f"insert_surrogate: unknown kind {kind!r}; known kinds: {sorted(SURROGATES)}")
    if kind is None and params:
        raise SnncError(f"insert_surrogate: kind=None removes surrogates and takes no parameters, got {sorted(params)}")
    if kind == "dsr" and not graph_spec(gm).get("T"):
        raise SnncError("insert_surrogate: kind='dsr' needs the multi-step graph (its backward sees the "
                        "whole sequence); run unroll_timesteps(gm, T) first")
    try:
        make_surrogate(kind, **params) if kind is not None else None
    except ValueError as e:
        raise SnncError(f"insert_surrogate: {e}") from None
    out = copy.deepcopy(gm)
    neurons = [m for m in out.modules() if isinstance(m, Neuron) and not getattr(m, "builtin_backward", False)]
    if kind == "dsr":
        for name, m in out.named_modules():
            if m in neurons and linear_charge(m) is None:
                raise SnncError(f"insert_surrogate: kind='dsr' needs IF/LIF neurons (linear charge); "
                                f"module '{name}' is {type(m).__name__}")
    for m in neurons:
        m.surrogate = make_surrogate(kind, **params) if kind is not None else None
    out.snnc_spec = dict(graph_spec(gm))
    # spikes the next layer saves for its weight gradient are kept as uint8 (exact, 1/4 the bytes)
    return compact_spikes(annotate(out)) if kind is not None else annotate(out)
