"""sinabs (``sinabs.layers``) -> snnc ops.

    IAF, IAFSqueeze, LIF, LIFSqueeze  -> snn.ms_lif   (``snnc/ops/multispike.py``)
        spike_fn  MultiSpike (default) -> spike="multi",  SingleSpike -> spike="single"
        reset_fn  MembraneSubtract(subtract_value) -> reset="subtract",
                  MembraneReset(reset_value)       -> reset="zero"
    min_v_mem, tau_syn (the synapse), norm_input and the layer's own alphas
    (``alpha_mem_calculated``, the exact float32 values sinabs multiplies by) are kept.

sinabs layers are multi-step and batch-first: ``[N, T, ...]`` (or ``[N*T, ...]`` for the Squeeze
layers, with ``batch_size`` or ``num_timesteps``); the snnc op keeps that layout, so the traced
graph takes the model's own input and the graph's spec records T. ``sinabs.from_model(ann,
batch_size=...)`` builds exactly such a network (its ``spiking_model``). Surrogate gradients are
not carried over (inference).
"""
from __future__ import annotations

import sinabs.activation as sa
import sinabs.layers as sl

from ..errors import UnsupportedOp
from ..ops import MultiSpikeLIF
from . import register_neuron

_SPIKES = ((sa.MultiSpike, "multi"), (sa.SingleSpike, "single"))


def _layer(mod, ctx, squeeze=False):
    kind = type(mod).__name__
    where = f"module '{ctx.path or kind}' (sinabs {kind})"
    spike = next((name for fn, name in _SPIKES if mod.spike_fn is fn), None)
    if spike is None:
        raise UnsupportedOp(f"{where}: spike_fn={getattr(mod.spike_fn, '__name__', mod.spike_fn)}; supported: "
                            "MultiSpike, SingleSpike")
    if isinstance(mod.reset_fn, sa.MembraneSubtract):
        reset = dict(reset="subtract", subtract=mod.reset_fn.subtract_value)
    elif isinstance(mod.reset_fn, sa.MembraneReset):
        reset = dict(reset="zero", reset_value=mod.reset_fn.reset_value)
    else:
        raise UnsupportedOp(f"{where}: reset_fn={type(mod.reset_fn).__name__}; supported: MembraneSubtract, "
                            "MembraneReset")
    if type(mod).__name__.endswith("Recurrent"):
        raise UnsupportedOp(f"{where}: recurrent sinabs layers have no snnc form")
    alpha_syn = mod.alpha_syn_calculated
    return MultiSpikeLIF(
        alpha_mem=mod.alpha_mem_calculated.detach(), alpha_syn=None if alpha_syn is None else alpha_syn.detach(),
        v_th=mod.spike_threshold.detach(), spike=spike,
        min_v=None if mod.min_v_mem is None else mod.min_v_mem.detach(), norm_input=bool(mod.norm_input),
        squeeze=(mod.batch_size, mod.num_timesteps) if squeeze else None, **reset)


register_neuron(sl.IAF, _layer)
register_neuron(sl.LIF, _layer)
register_neuron(sl.IAFSqueeze, lambda m, ctx: _layer(m, ctx, squeeze=True))
register_neuron(sl.LIFSqueeze, lambda m, ctx: _layer(m, ctx, squeeze=True))


def unsupported(mod) -> str | None:
    from sinabs.layers import StatefulLayer
    if isinstance(mod, StatefulLayer):
        return "stateful sinabs layer without an snnc mapping; supported: IAF, IAFSqueeze, LIF, LIFSqueeze"
    return None
