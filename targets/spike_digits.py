"""One int8 digit instead of two for the spike convs that can afford it (``tvm:llvm``'s
``spike_digits``): half the int8 work of that layer, chosen per layer by measured spike agreement.

Why: on a host with AVX512-VNNI but no AMX the fused conv+neuron kernel (``spike_fused.py``) runs at
~97% of ``vpdpbusd``'s rate with two weight digits (``tvm_spike_conv.pack_weights``): the
instruction count is the floor. One digit halves it, but a weight is then off by up to half a step
of ``max|w_c| / 127``; whether the spikes survive that depends on the layer and the data. On the
bench net (3 convs + LIF, 24-31% firing) one digit in the last conv kept 99.86% of the output
spikes with round-to-nearest, one in the middle conv only 98.3% (its errors spread through the next
layer), so the choice is made per layer, by measurement, never assumed.

**Rounding.** Round-to-nearest leaves, per (output channel, input channel), a sum of residuals
over the kernel taps of up to ``KH*KW/2`` steps, which a spike pattern uniform over the window (the
common case) sees whole. Without data (``spike_digits=1``), ``one_digit`` rounds the fewest taps the
other way so each such sum is within half a step of zero (balanced rounding: the *expected* error,
not the per-weight error, biases the next layer, Nagel 2019): 99.91% on that layer. With calibration
inputs (``"auto"``) it minimises the measured output error instead, ``E[(sum_k r_k x_k)^2]`` over the
layer's calibration inputs x (the AdaRound objective, Nagel 2020, solved by greedy coordinate descent
between floor and ceiling, from the balanced start): 99.93% on held-out inputs. Either way every
weight stays within one step ``s_c`` of its value and the stated bound per output channel, for any
0/1 input, is ``max(sum of positive residuals, sum of |negative residuals|)``.

``choose(g, calib, min_agreement)``: greedy from the last spike conv to the first (a late layer's
errors reach fewer layers), keep one digit for a layer if the graph's output spikes on the
calibration inputs still agree with the fp32 reference on at least ``min_agreement`` of their
elements, with the later layers' choices in place. A kept layer's weights in the compiled copy of
the graph become their one-digit values ``s*q``: every runner of the hybrid module (the fused
one-digit kernel, oneDNN's two digits, fp32 torch) and the exported library then compute with the
same weights. The choice is reported (``meta["spike_digits"]``: digits, measured agreement, bound).
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from snnc.errors import SnncError, one_of

DIGIT_CHOICES = (1, 2, "auto")


def _balance(u, q):
    """``q`` (rows of integers near ``u``) with the fewest entries of each row moved to the other
    side of ``u`` so that the row's residuals ``u - q`` sum to within 1/2."""
    res = u - q
    need = torch.round(res.sum(-1))
    order = torch.argsort(res, dim=-1, descending=True)   # largest residual first: rounding it up costs least
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    up = (need > 0).unsqueeze(-1) & (rank < need.unsqueeze(-1))
    down = (need < 0).unsqueeze(-1) & (rank >= order.shape[-1] + need.unsqueeze(-1))
    return q + up.double() - down.double()


def _second_moment(conv, inputs, images=16):
    """``E[x x^T]`` ``[K, K]`` of the conv's im2col columns over (up to ``images`` of) its inputs."""
    x = inputs[:images].float()
    C, n = 0.0, 0
    for chunk in x.split(8):
        cols = torch.nn.functional.unfold(chunk, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
        C = C + torch.einsum("bkl,bjl->kj", cols, cols).double()   # exact: sums of 0/1 products
        n += cols.shape[0] * cols.shape[2]
    return C / n


def _descend(u, q, C, top):
    """Greedy coordinate descent on ``r^T C r`` (r = u - q per row) with each q_k in {floor, ceil}
    of u_k; the weights at the channel's full scale (|u| = 127, ``top``) stay put (they set s)."""
    lo, hi = torch.floor(u), torch.ceil(u)
    g = (u - q) @ C                                 # (C r)_k for every row
    for k in tqdm(range(u.shape[1]), desc="one-digit rounding", disable=None, leave=False):
        other = torch.where(q[:, k] == lo[:, k], hi[:, k], lo[:, k])
        d = q[:, k] - other                         # how r_k changes if q_k moves to `other`
        flip = (2 * d * g[:, k] + d * d * C[k, k] < -1e-12) & ~top[:, k]
        if flip.any():
            d = torch.where(flip, d, torch.zeros_like(d))
            q[:, k] = torch.where(flip, other, q[:, k])
            g += d[:, None] * C[k][None, :]
    return q


def one_digit(w: torch.Tensor, conv=None, inputs=None):
    """``(q [O, ...] int8, s [O] fp32, bound [O] fp32)``: ``w ~ s[:, None, ...] * q``, balanced
    rounding, or with ``inputs`` (the ``conv``'s calibration inputs) the rounding that minimises the
    measured output error (module docstring); every ``|w/s - q| <= 1``; ``bound[o]`` is the largest
    error of output ``o`` over all 0/1 inputs."""
    r = w.detach().double()
    O = r.shape[0]
    s = (r.abs().flatten(1).amax(1) / 127).float()
    s = torch.where(s > 0, s, torch.ones_like(s))   # an all-zero channel: any scale, digits 0
    u = r / s.double().view(-1, *(1,) * (r.dim() - 1))
    q = _balance(u.reshape(O * r.shape[1], -1), torch.round(u).reshape(O * r.shape[1], -1)).reshape(u.shape) \
        if r.dim() > 2 else torch.round(u)
    if inputs is not None:
        u2 = u.reshape(O, -1)
        q = _descend(u2, q.reshape(O, -1).clone(), _second_moment(conv, inputs), u2.abs() >= 127).reshape(u.shape)
    q = q.clamp(-127, 127)
    err = (u - q).reshape(O, -1) * s.double().view(-1, 1)   # w - s*q, per weight
    bound = torch.maximum(err.clamp(min=0).sum(1), (-err).clamp(min=0).sum(1)).float()
    return q.to(torch.int8), s, bound


def candidates(g: fx.GraphModule) -> list:
    """The Conv2d nodes whose input is proven 0/1 spikes and that the fused kernel takes: where a
    digit count means something, in graph order."""
    from .spike_conv import binary_input
    from .spike_fused import fused_applies
    from snnc.ir import info
    out = []
    for n in g.graph.nodes:
        if n.op == "call_module" and type(g.get_submodule(n.target)) is nn.Conv2d and binary_input(g, n):
            meta = info(n.args[0]) if n.args and isinstance(n.args[0], fx.Node) else None
            if meta is not None and fused_applies(g.get_submodule(n.target), meta.shape):
                out.append(n)
    return out


def _rounded(g, targets, conv_inputs=None):
    """``{target: (one-digit weight s*q, bound)}`` for the convs ``targets`` of ``g`` (``conv_inputs``:
    each conv's calibration inputs, or None for data-free rounding)."""
    out = {}
    for target in targets:
        conv = g.get_submodule(target)
        q, s, bound = one_digit(conv.weight, conv, None if conv_inputs is None else conv_inputs[target])
        out[target] = (q.float() * s.view(-1, *(1,) * (q.dim() - 1)), bound)
    return out


def _with_weights(g, rounded):
    """A copy of ``g`` whose convs hold the given weights."""
    trial = copy.deepcopy(g)
    trial.snnc_spec = g.snnc_spec
    with torch.no_grad():
        for target, (w, _) in rounded.items():
            trial.get_submodule(target).weight.copy_(w)
    return trial


def _inputs_of(g, targets, calib):
    """``(graph output, {target: the conv's input})`` of a reference run on ``calib``."""
    from snnc.runtime import run
    seen = {}

    def keep(target):
        def hook(module, args, output):   # returns None: the output stays the conv's
            seen.setdefault(target, args[0].detach())
        return hook
    hooks = [g.get_submodule(t).register_forward_hook(keep(t)) for t in targets]
    try:
        with torch.no_grad():
            out = run(g, calib)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


def choose(g: fx.GraphModule, spike_digits, calib=None, min_agreement: float = 0.999):
    """``(graph, report)``: ``g`` itself (two digits everywhere) or a copy whose one-digit convs hold
    their rounded weights (module docstring), for ``spike_digits`` 1, 2 or "auto"; ``report``:
    ``{conv target: {"digits", "agreement" (measured, "auto" only), "error_bound"}}``. The options
    are ``apply``'s, checked there."""
    from snnc.runtime import run
    targets = [n.target for n in candidates(g)]
    if spike_digits == 2 or not targets:
        return g, {}
    if spike_digits == 1:
        rounded = _rounded(g, targets)
        return _with_weights(g, rounded), {t: {"digits": 1, "agreement": None, "error_bound": float(b.max())}
                                           for t, (_, b) in rounded.items()}
    if calib is None:
        raise SnncError("tvm:llvm: spike_digits='auto' measures spike agreement on calibration inputs: pass "
                        "calib=<a [T, N, ...] input batch>")
    ref, inputs = _inputs_of(g, targets, calib)
    kept, report = {}, {}
    for target in tqdm(list(reversed(targets)), desc="spike_digits: one digit per conv?", disable=None,
                       leave=False):   # a late layer's errors reach fewer layers
        mine = _rounded(g, [target], inputs)
        with torch.no_grad():
            agree = float((run(_with_weights(g, {**kept, **mine}), calib) == ref).float().mean())
        if agree >= min_agreement:
            kept.update(mine)
        report[target] = {"digits": 1 if target in kept else 2, "agreement": round(agree, 6),
                          "error_bound": float(mine[target][1].max()) if target in kept else None}
    return (_with_weights(g, kept) if kept else g), dict(reversed(report.items()))


def _check(spike_digits, calib, min_agreement):
    one_of("tvm:llvm", "spike_digits", spike_digits, DIGIT_CHOICES, SnncError)
    if not 0.0 < min_agreement <= 1.0:
        raise SnncError(f"tvm:llvm: min_agreement={min_agreement!r}; expected a fraction in (0, 1]")
    if calib is not None and not isinstance(calib, torch.Tensor):
        raise SnncError(f"tvm:llvm: calib must be a [T, N, ...] input tensor, got {type(calib).__name__}")


def apply(g, spike_digits, calib, min_agreement, int8: bool):
    """``(graph, report)`` for ``snnc.compile``: ``g``, or where ``spike_digits`` keeps one weight
    digit for some spike convs (``choose``) a copy holding their rounded weights, with
    ``snnc_spike_digits`` = ``{target: error bound}`` recorded on it for the lowerings. Nothing
    changes where no int8 spike kernel runs (``int8`` False: the digits are theirs) or for 2."""
    _check(spike_digits, calib, min_agreement)
    if spike_digits == 2 or not int8:
        return g, {}
    out, report = choose(g, spike_digits, calib, min_agreement)
    out.snnc_spike_digits = {t: r["error_bound"] for t, r in report.items() if r["digits"] == 1}
    return out, report
