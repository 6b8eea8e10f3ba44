"""Linear layers on the host's fastest GEMM, chosen by a measured race (opt-in: ``fast_linears``).

Why: torch's CPU ``nn.Linear`` always runs MKL's sgemm for float32 (oneDNN only under a reduced
``fp32_precision``). MKL picks its kernels by CPU vendor; on an AMD Zen host with AVX-512 oneDNN's
``brg_matmul:avx512_core`` ran the Open Neuromorphic forward ``[8000, 1024] x [1024, 1024]`` in
~0.7x MKL's time, while for other shapes (the weight gradient's long reduction) MKL can win. So
nothing is assumed: the first call of each GEMM shape times every backend on the real operands
(``RACE_ROWS`` rows of them, interleaved, best of ``RACE_RUNS``) and that shape keeps the winner
(``picks()`` records it). Setting ``torch.backends.mkldnn.matmul.fp32_precision = "bf16"`` would
also reach oneDNN, but it *allows* bf16 arithmetic, which AMX hosts then use: not float32.

Every Linear call becomes three GEMMs of the form ``a @ b.T (+ bias)``: the forward
``x @ W.T + b``, the input gradient ``g @ W`` and the weight gradient ``g.T @ x``; each is raced
on its own. Guarantees per ``precision``:

* ``"float32"`` (default): IEEE float32 products and float32 accumulation in every backend, so
  each output is within ``K * 2^-24 * sum_k |a_k b_k|`` (the standard dot-product bound, ``K``
  the reduction length) of the exact value; tested against float64. Backends may differ from one
  another (and from plain ``nn.Linear``) in the last bits: the summation order differs. With
  ``backend="mkl"`` the forward is bit-identical to ``nn.Linear`` (the same ``addmm`` call).
* ``"bfloat16"`` (explicit opt-in, needs a CPU with native bf16: AVX512_BF16 or AMX): operands
  rounded to bfloat16 (8 significant bits, unit roundoff u = 2^-8), exact products, float32
  accumulation, the result rounded to bfloat16 by oneDNN (torch's CPU matmul has no bf16 x bf16
  -> float32 form), then the bias added in float32. Bound per output (K <= 2^16):
  ``|y - y_exact| <= 2^-6 * sum_k |a_k b_k|`` (2u from the operands, u from the result, the
  float32 sum's K * 2^-24 <= 2^-8); tested against float64. About twice float32's speed where
  the host has AVX512_BF16 (2x the multiply-adds per instruction). The saved input is kept in
  bfloat16 (half the bytes). Spikes near the threshold may flip: use it for training speed, not
  for bit-exact comparisons.

**Feature-major output.** A Linear whose output feeds only a neuron that runs the native scan
(in a ``compact_spikes`` training graph: ``spike_store.neuron_fed_by``) computes ``y^T = W x^T``
instead, ``[features, T*B]`` in memory, and returns it as the ``[T, B, features]`` view: the
same GEMM flops, but (1) the scan walks each feature's T steps as one contiguous row
(``native.feature_major``), (2) the scan's dL/dy comes back in that layout, which is the
contiguous ``g^T`` the weight gradient ``g^T x`` needs as oneDNN's source operand: the standard
layout costs a transposed copy of ``g`` (oneDNN's linear takes only a contiguous source; 24 ms
CPU of the 8000x1024 Open Neuromorphic step), and (3) the bias gradient is a row sum. The
bias is added to ``y^T`` in place (one pass) rather than by oneDNN. Same float32 bound.

``fast_linears(gm)`` installs forward hooks on each ``nn.Linear`` of ``gm`` (the module types
and the graph are unchanged, so ``snnc.dump``, saving and the spike hooks of ``spike_store`` see
the same graph): while a Linear runs, a ``TorchFunctionMode`` routes its ``F.linear`` to
``_Linear``. Inputs that are not float32 on the CPU go to ``F.linear`` unchanged.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..errors import SnncError, one_of

PRECISIONS = ("float32", "bfloat16")
BACKENDS = ("mkl", "onednn")
LAYOUTS = ("auto", "standard")
RACE_ROWS = 2048   # rows of the operands a race times (the full GEMM at n=4096 costs seconds)
RACE_RUNS = 3
_picks: dict = {}  # (op, precision, M, K, N, threads) -> backend
_lock = threading.Lock()


def _onednn_ok() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def bf16_native() -> bool:
    """Whether oneDNN has native bfloat16 kernels here (AVX512_BF16 / AMX); elsewhere it emulates."""
    return _onednn_ok() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _nt(a, b, bias, backend, precision):
    """``a @ b.T + bias`` (``bias`` may be None) as ``[M, N]`` float32; ``a [M, K]``, ``b [N, K]``
    may be transposed views (each backend takes the layout it can, copying otherwise)."""
    if precision == "bfloat16":   # always oneDNN: torch's CPU bf16 matmul is oneDNN's
        out = torch.ops.mkldnn._linear_pointwise(a.to(torch.bfloat16), b.to(torch.bfloat16), None, "none", [], "")
        return out.float() if bias is None else torch.add(out, bias)   # promotes to float32: one pass
    if backend == "onednn":
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
    return torch.mm(a, b.t()) if bias is None else torch.addmm(bias, a, b.t())   # what F.linear runs


def _race(op, a, b, bias, precision, forced):
    """The backend for ``op`` on this shape: ``forced``, the recorded pick, or a race's winner."""
    if precision == "bfloat16":
        return "onednn"
    if forced is not None:
        return forced
    key = (op, precision, a.shape[0], a.shape[1], b.shape[0], torch.get_num_threads())
    pick = _picks.get(key)
    if pick is not None:
        return pick
    options = [k for k in BACKENDS if k != "onednn" or _onednn_ok()]
    if len(options) > 1:
        # a slice of the real operands' T*B rows: the reduction of the weight gradient, a's rows
        # in the standard forward / input gradient, b's rows in their feature-major forms
        rows = slice(0, RACE_ROWS)
        sa, sb = ((a[:, rows], b[:, rows]) if op.startswith("weight_grad") else
                  (a, b[rows]) if op.endswith("_fm") else (a[rows], b))
        from ..report import fastest   # (snnc.report imports snnc.ops)
        with torch.no_grad():   # interleaved, after a first call each (oneDNN creates its primitive)
            pick, _ = fastest({k: (lambda k=k: _nt(sa, sb, bias, k, precision)) for k in options}, RACE_RUNS)
    else:
        pick = options[0]
    with _lock:
        _picks[key] = pick
    return pick


def picks() -> dict:
    """The recorded race winners: ``{"forward 8000x1024x1024": "onednn", ...}`` (op, M x K x N)."""
    with _lock:
        return {f"{op} {m}x{k}x{n}" + ("" if p == "float32" else f" {p}") + f" t{t}": v
                for (op, p, m, k, n, t), v in _picks.items()}


def clear_picks():
    """Forget the race winners (the next call of each shape races again)."""
    with _lock:
        _picks.clear()


class _Linear(torch.autograd.Function):
    """``x @ W.T + b`` with each of the three GEMMs on its raced backend; ``fm``: the output is
    feature-major (module docstring), and the gradients are computed in that layout."""

    @staticmethod
    def forward(ctx, x, weight, bias, precision, forced, fm):
        x2 = x.reshape(-1, x.shape[-1])
        if precision == "bfloat16":   # cast once: the forward reads it and backward keeps it (half the bytes)
            x2 = x2.to(torch.bfloat16)
        if fm:   # y^T = W x^T, [out, rows]; the bias per row of y^T, in place
            yt = _nt(weight, x2, None, _race("forward_fm", weight, x2, None, precision, forced), precision)
            y = (yt if bias is None else yt.add_(bias[:, None])).t()
        else:
            y = _nt(x2, weight, bias, _race("forward", x2, weight, bias, precision, forced), precision)
        ctx.precision, ctx.forced, ctx.fm, ctx.has_bias, ctx.x_shape = precision, forced, fm, bias is not None, x.shape
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        return y.reshape(*x.shape[:-1], weight.shape[0])   # a view: y^T's layout is kept

    @staticmethod
    def backward(ctx, grad_y):
        x2, weight = ctx.saved_tensors
        g = grad_y.reshape(-1, grad_y.shape[-1])
        p, forced = ctx.precision, ctx.forced
        gx = gw = gb = None
        gt = g.t()
        if ctx.fm and not gt.is_contiguous():   # dL/dy from elsewhere than the scan: one copy
            gt = gt.contiguous()
        if ctx.needs_input_grad[0]:
            if ctx.fm:   # dL/dx^T = W^T g^T, feature-major like y
                wt = weight.t().contiguous()
                gx = _nt(wt, g, None, _race("input_grad_fm", wt, g, None, p, forced), p).t().reshape(ctx.x_shape)
            else:
                wt = weight.t()
                gx = _nt(g, wt, None, _race("input_grad", g, wt, None, p, forced), p).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            xt = x2.t()
            op = "weight_grad_fm" if ctx.fm else "weight_grad"
            gw = _nt(gt, xt, None, _race(op, gt, xt, None, p, forced), p)
        if ctx.needs_input_grad[2] and ctx.has_bias:
            gb = gt.sum(1)
        return gx, gw, gb, None, None, None


class _RouteLinear(TorchFunctionMode):
    def __init__(self, precision, forced, fm=False):
        super().__init__()
        self.precision, self.forced, self.fm = precision, forced, fm

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and len(args) + len(kwargs) <= 3:
            x, w = args[0], args[1]
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            if (x.dim() >= 2 and x.dtype == w.dtype == torch.float32 and x.device.type == w.device.type == "cpu"
                    and (b is None or b.dtype == torch.float32) and x.numel() > 0):
                return _Linear.apply(x, w, b, self.precision, self.forced, self.fm)
        return func(*args, **kwargs)


_HOOK_ATTR = "_snnc_fast_linear"
_local = threading.local()   # per thread: the modes pushed by Linear calls in flight (a module may run in several threads)


def _feature_major(module, args) -> bool:
    """Whether this call's output goes, alone, to a neuron running the native scan (module
    docstring), and its backward is this module's own (a spike input has ``spike_layers``')."""
    if not torch.is_grad_enabled():
        return False
    from . import spike_store
    from .neuron_scan import runs_native_scan
    neuron = spike_store.neuron_fed_by(module)
    return (neuron is not None and runs_native_scan(neuron) and len(args) == 1
            and spike_store.lookup(args[0]) is None)


def _enter(module, args):
    stack = _local.__dict__.setdefault("modes", [])
    if torch.compiler.is_compiling():   # dynamo traces F.linear itself
        stack.append(None)
        return
    precision, backend, layout = getattr(module, _HOOK_ATTR)
    mode = _RouteLinear(precision, backend, layout == "auto" and _feature_major(module, args))
    mode.__enter__()
    stack.append(mode)


def _exit(module, args, output):
    stack = _local.__dict__.get("modes")
    mode = stack.pop() if stack else None
    if mode is not None:
        mode.__exit__(None, None, None)


def fast_linears(gm: nn.Module, precision: str = "float32", backend: str | None = None,
                 layout: str = "auto") -> nn.Module:
    """Route every ``nn.Linear`` of ``gm`` (in place; returns ``gm``) through the raced GEMMs.

    ``precision``: ``"float32"`` (within float32 rounding, see the module docstring) or
    ``"bfloat16"`` (explicit opt-in, bound 2^-6 * sum |a b|; needs native bf16 in the CPU).
    ``backend``: None races MKL against oneDNN per shape; ``"mkl"`` / ``"onednn"`` forces one
    (``$SNNC_GEMM`` does the same for every graph). ``layout``: ``"auto"`` gives a Linear that
    feeds a native neuron scan a feature-major output (module docstring), ``"standard"`` never.
    Calling it again changes the settings."""
    one_of("fast_linears", "precision", precision, PRECISIONS, SnncError)
    one_of("fast_linears", "layout", layout, LAYOUTS, SnncError)
    backend = backend if backend is not None else (os.environ.get("SNNC_GEMM") or None)
    if backend is not None and backend not in BACKENDS:
        raise SnncError(f"fast_linears: backend must be None or one of {list(BACKENDS)} (argument or $SNNC_GEMM), "
                        f"got {backend!r}")
    if backend == "onednn" and not _onednn_ok():
        raise SnncError("fast_linears: backend='onednn' but this torch build has no oneDNN (torch.backends.mkldnn)")
    if precision == "bfloat16" and not bf16_native():
        raise SnncError("fast_linears: precision='bfloat16' needs a CPU with native bfloat16 (AVX512_BF16 or "
                        "AMX-BF16) and a torch build with oneDNN; use precision='float32' here")
    for m in gm.modules():
        if isinstance(m, nn.Linear):
            setattr(m, _HOOK_ATTR, (precision, backend, layout))
            if _enter not in m._forward_pre_hooks.values():
                # _exit pops first, before hooks that look at the output (spike_store's)
                m.__dict__[_HANDLES_ATTR] = (m.register_forward_pre_hook(_enter),
                                             m.register_forward_hook(_exit, always_call=True, prepend=True))
    return gm


_HANDLES_ATTR = "_snnc_fast_linear_handles"


@contextlib.contextmanager
def routed_linears(gm: nn.Module, precision: str = "float32"):
    """``fast_linears(gm, precision)`` within the block; the Linears that were not routed before
    are plain ``nn.Linear`` again after it (``retrain``'s ``linears="float32"``: the trained graph
    then runs inference exactly as before). Already routed Linears keep their settings."""
    fresh = [m for m in gm.modules() if isinstance(m, nn.Linear) and _enter not in m._forward_pre_hooks.values()]
    for m in fresh:
        fast_linears(m, precision)
    try:
        yield gm
    finally:
        for m in fresh:
            for handle in m.__dict__.pop(_HANDLES_ATTR, ()):
                handle.remove()
            m.__dict__.pop(_HOOK_ATTR, None)
