"""``snnc.convert``: ANN -> SNN in one call (trace -> fold_bn -> threshold_balance -> unroll).

    snn = snnc.convert(ann, calib_x, T=8, method="percentile")    # multi-step graph, T=8
    y = snnc.run(snn, x)                                           # logits estimate [N, classes]

Methods (``passes/threshold_balance.py`` has the details and papers): ``"max"``,
``"percentile"`` (default, q=99.9), ``"mse"`` (low latency: scales tuned for the T given, with
half-threshold start), ``"spiking"`` (Rathi 2020 layer-by-layer balancing), ``"qcfs"`` (an ANN
trained with ``snnc.ops.QCFS`` activations, Bu 2022; no calibration data needed).
"""
from __future__ import annotations

import copy

from torch import fx, nn

from .errors import InputError, SnncError


def convert(model, calib=None, T: int | None = None, method: str = "percentile", *, example=None,
            **options) -> fx.GraphModule:
    """Convert an ANN into a spiking-IR graph.

    ``model``: an ``nn.Module`` (traced in eval mode on a copy) or a graph from ``snnc.trace``.
    ``calib``: calibration inputs (tensor ``[N, ...]`` or an iterable of ``x`` / ``(x, y)``
    batches; a few hundred samples are plenty). ``T``: if given, the result is unrolled over T
    steps (one call runs all of them, input ``[N, ...]``); if None, the per-step graph is
    returned (``snnc.run(g, x, T=...)`` runs it). ``method`` and ``options`` go to
    ``threshold_balance`` (``q``, ``channel_wise``, ``reset``, ``encoding``, ``scale``,
    ``v_init_fraction``, ``T_calib``, ``max_pool`` ...); for ``method="mse"`` the scales are tuned
    for ``T`` unless ``T_target`` is given.
    """
    from snnc.passes import fold_bn, threshold_balance, unroll_timesteps
    from snnc.passes._calibration import calibration_batches
    from .tracer import trace

    if T is not None and (not isinstance(T, int) or T < 1):
        raise InputError(f"snnc.convert: T must be a positive int or None, got {T!r}")
    if calib is not None:   # one pass over a loader; a tensor/Dataset/split becomes batches too
        calib = calibration_batches(calib)
    if isinstance(model, fx.GraphModule) and hasattr(model, "snnc_spec"):
        graph = model
    elif isinstance(model, nn.Module):
        if example is None and calib is None:
            raise InputError("snnc.convert: cannot infer the input shape: pass calibration data "
                             "(a tensor [N, ...] or a loader) or example=<one input batch>")
        graph = trace(copy.deepcopy(model).eval(), example if example is not None else calib[0][:1])
    else:
        raise SnncError(f"snnc.convert: model is a {type(model).__name__}; expected an nn.Module or a graph "
                        "from snnc.trace")
    if method == "mse" and T is not None:
        options.setdefault("T_target", T)
    snn = threshold_balance(fold_bn(graph), calib, method=method, **options)
    return unroll_timesteps(snn, T) if T is not None else snn
