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

import torch
from torch import fx, nn

from .errors import InputError, SnncError


def _example_from(calib, example):
    if example is not None:
        return example
    if isinstance(calib, torch.Tensor) and calib.dim() > 0 and len(calib):
        return calib[:1]
    if calib is not None and not isinstance(calib, torch.Tensor):
        for batch in calib:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            if isinstance(x, torch.Tensor) and x.dim() > 0 and len(x):
                return x[:1]
            break
    raise InputError("snnc.convert: cannot infer the input shape: pass calibration data "
                     "(a tensor [N, ...] or a loader) or example=<one input batch>")


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
    from .tracer import trace

    if T is not None and (not isinstance(T, int) or T < 1):
        raise InputError(f"snnc.convert: T must be a positive int or None, got {T!r}")
    if isinstance(model, fx.GraphModule) and hasattr(model, "snnc_spec"):
        graph = model
    elif isinstance(model, nn.Module):
        graph = trace(copy.deepcopy(model).eval(), _example_from(calib, example))
    else:
        raise SnncError(f"snnc.convert: model is a {type(model).__name__}; expected an nn.Module or a graph "
                        "from snnc.trace")
    if method == "mse" and T is not None:
        options.setdefault("T_target", T)
    snn = threshold_balance(fold_bn(graph), calib, method=method, **options)
    return unroll_timesteps(snn, T) if T is not None else snn
