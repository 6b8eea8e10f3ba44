"""``snnc.convert``: ANN -> SNN in one call (trace -> fold_bn -> threshold_balance -> unroll).

    snn = snnc.convert(ann, calib_x, T=8)          # multi-step graph, T=8, recipe chosen for T=8
    y = snnc.run(snn, x)                           # logits estimate [N, classes]
    snn.snnc_conversion                            # what was chosen, and every candidate's score

With no ``method``, the recipe is chosen by measurement (``_recipe_search.py``): each candidate recipe is
converted and run for T steps on the calibration inputs, and the one whose SNN agrees best with the
ANN's own predictions there wins (no labels needed); where no recipe with 0/1 spikes agrees on
99% of those inputs (deep nets at T <= 8), burst-spike recipes (``burst=4``: up to 4 spikes per
step, ``snnc.ops.BurstIF``) are tried too and kept if they agree better (``burst=1`` forbids them).
Methods (``passes/threshold_balance.py`` has
the details and papers): ``"max"``, ``"percentile"`` (q=99.9), ``"mse"`` (low latency: scales
tuned for the T given, with half-threshold start), ``"spiking"`` (Rathi 2020 layer-by-layer
balancing), ``"qcfs"`` (an ANN trained with ``snnc.ops.QCFS`` activations, Bu 2022, e.g. by
``snnc.conversion.train_qcfs``; no calibration data needed).
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .errors import InputError, SnncError

AUTO_T = 32   # the T a per-step (T=None) conversion is scored at, unless T_target is given


def convert(model, calib=None, T: int | None = None, method: str | None = None, *, example=None,
            **options) -> fx.GraphModule:
    """Convert an ANN into a spiking-IR graph.

    ``model``: an ``nn.Module`` (traced in eval mode on a copy) or a graph from ``snnc.trace``.
    ``calib``: calibration inputs (tensor ``[N, ...]`` or an iterable of ``x`` / ``(x, y)``
    batches; a few hundred samples are plenty). ``T``: if given, the result is unrolled over T
    steps (one call runs all of them, input ``[N, ...]``); if None, the per-step graph is
    returned (``snnc.run(g, x, T=...)`` runs it). ``method=None`` picks the recipe that measures
    best for ``T`` (or ``T_target``, default 32, when T is None) on the calibration data; the
    result's ``snnc_conversion`` attribute says which and why. ``method`` and ``options`` go to
    ``threshold_balance`` (``q``, ``channel_wise``, ``reset``, ``encoding``, ``scale``,
    ``v_init_fraction``, ``T_calib``, ``max_pool``, ``bias_correction``, ``burst`` ...); with
    ``method=None`` the options given fix those choices for every candidate. For ``method="mse"``
    the scales (and ``readout_calibration``, on by default for the chosen recipe) are tuned for ``T``
    unless ``T_target`` is given.
    """
    from snnc.passes import fold_bn, threshold_balance, unroll_timesteps
    from snnc.passes._calibration import calibration_batches
    from ._recipe_search import choose
    from .tracer import trace

    if T is not None and (not isinstance(T, int) or isinstance(T, bool) or T < 1):
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
    folded = fold_bn(graph)
    if method is None:
        T_score = T if T is not None else options.get("T_target", AUTO_T)
        snn, report = choose(folded, calib, T_score, options)
    else:
        if T is not None and (method == "mse" or options.get("readout_calibration")):
            options.setdefault("T_target", T)   # tuned / calibrated for the T it will run at
        snn = threshold_balance(folded, calib, method=method, **options)
        report = {"method": method, "options": dict(options), "chosen_by": "user"}
    out = unroll_timesteps(snn, T) if T is not None else snn
    out.snnc_conversion = report
    return out


def train_qcfs(model: nn.Module, data, epochs: int = 10, L: int = 4, lr: float = 1e-3, calib=None,
               q: float = 99.9, seed: int = 0, batch_size: int = 64) -> nn.Module:
    """Bu 2022 (ICLR) QCFS training: replace every ``nn.ReLU`` of (a copy of) a trained ANN by
    ``QCFS(L)`` with its threshold initialised to that ReLU's ``q``-th output percentile on
    ``calib`` (default: up to 512 training inputs), fine-tune ``epochs`` with Adam (cross-entropy)
    and return it in eval mode. Then ``snnc.convert(m, method="qcfs", T=...)`` (or no method: a
    QCFS net is converted with its trained thresholds): at ``T = L`` the SNN computes the ANN's
    quantised activations with zero expected error (Bu 2022, Theorem 2).

    ``data``: an ``snnc.data`` split (``.loaders()``, ``.x_train``) or a loader of ``(x, y)``.
    """
    from .ops.qcfs import QCFS, use_qcfs
    from .passes._calibration import calibration_batches

    if not isinstance(L, int) or isinstance(L, bool) or L < 1:
        raise InputError(f"train_qcfs: L must be a positive int, got {L!r}")
    if not isinstance(epochs, int) or epochs < 0:
        raise InputError(f"train_qcfs: epochs must be an int >= 0, got {epochs!r}")
    if hasattr(data, "loaders") and hasattr(data, "x_train"):
        loader = data.loaders(batch_size=batch_size, seed=seed)[0]
        calib = data.x_train[:512] if calib is None else calib
    else:
        loader = data
        calib = [next(iter(data))] if calib is None else calib
    m = copy.deepcopy(model).eval()
    relus = {name: c for name, c in m.named_modules() if isinstance(c, nn.ReLU)}
    if not relus:
        raise SnncError("train_qcfs: the model has no nn.ReLU module to replace (functional relu calls "
                        "cannot be swapped; use nn.ReLU modules)")
    peaks = {name: [] for name in relus}   # every call of a (shared) ReLU module counts
    hooks = [c.register_forward_hook(lambda _m, _a, out, name=name: peaks[name].append(out.detach().flatten()))
             for name, c in relus.items()]
    with torch.no_grad():
        for x in calibration_batches(calib):
            m(x)
    for h in hooks:
        h.remove()
    use_qcfs(m, L=L)
    for name, values in peaks.items():
        v = torch.cat(values)
        v = v[v > 0]
        lam = float(torch.quantile(v[:1 << 20], q / 100.0)) if v.numel() else 1.0
        qcfs = m.get_submodule(name)
        assert isinstance(qcfs, QCFS)
        qcfs.threshold.data.fill_(max(lam, 1e-3))
    torch.manual_seed(seed)
    opt = torch.optim.Adam(m.parameters(), lr=lr)
    m.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    return m.eval()


def max_pool_to_avg_pool(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.MaxPool2d`` replaced by an ``nn.AvgPool2d`` of the same
    kernel, stride and padding (the classic way round max pooling in conversion, Cao 2015 /
    Diehl 2015): fine-tune it for an epoch or two before converting, since the ANN's function
    changes. ``snnc.convert`` converts MaxPool2d directly (``max_pool="lateral"``) without it."""
    m = copy.deepcopy(model)
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.MaxPool2d):
                setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode, count_include_pad=False))
    return m
