"""Training convolutions: channels_last fp32, and an int8 forward on spike inputs (``spike_convs``).

Why (measured on the bench net's 128->128 3x3 conv, 2-core AMD Zen 5 host, interleaved): torch's
Conv2d on row-major (NCHW) fp32 tensors reorders its input and output to oneDNN's blocked layout
on every call; in channels_last memory the forward, the data gradient and the weight gradient took
0.77x, 0.78x and 0.88x the NCHW time. The fused neuron scans are elementwise within a step and
keep the dense layout they are given (``native.time_major``), so once the first conv produces
channels_last, every tensor of the step stays in it without a copy.

A Conv2d whose input is the spike output of a fused scan (``spike_store.lookup`` finds its uint8
copy) runs its forward in int8 under ``spike_convs("int8")``: the uint8 spikes stacked as
``[254*s | s]`` times the weights' two int8 digits (``snnc.targets.spike_conv.stacked_int8``, the
inference path's form), one u8 x s8 oneDNN conv (AVX512-VNNI / AMX-INT8) with exact int32
accumulation and one fp32 scale per output channel (0.43x the fp32 NCHW conv's time here). Bound,
per output channel c and any 0/1 input (``int8_error_bound``):

    |y_int8 - y_fp32| <= k * max|w_c| / (2 * 127 * 254) + fp32 rounding,   k = C_in/groups * kh * kw

Its backward is the fp32 conv's at the same input (straight-through on the weight rounding):
dL/dx = conv^T(dL/dy, W), dL/dW = sum dL/dy (x) s from the uint8 spikes (``spike_layers.conv_backward``).
Where the spikes are sparse (``SPARSE_RATE``), dL/dW is summed event by event instead: one row of
dL/dy per (spike, kernel tap), exact products (s = 1), fp32 sums in another order (in every mode
but "exact"; ``native.spike_weight_grad``). In both fast modes the conv keeps the uint8 spikes
(not the float32 ones) for its backward, as the exact mode's ``spike_layers`` hook does.

A training conv's output can be rebuilt in backward (``recompute_recipe``, ``recompute``: the same
``_conv_forward`` on its saved input and weight, bit-identical), so the neuron scan that reads it
need not keep its membrane (``spike_store.scan_state("auto" | "recompute")``).

Modes (per thread): ``"exact"`` (default): convs are the modules' own, bit-identical to the
inference graph; ``"float32"``: channels_last fp32 (the same products, another summation order);
``"int8"``: as float32, plus the int8 forward where the input is spikes and the CPU has int8
dot-product instructions (``spike_conv.int8_isa``). Only calls under autograd with fp32 CPU
tensors and numeric padding change; everything else runs torch's own conv.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import weakref

import torch
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from . import native, spike_store
from ..errors import one_of
from .spike_layers import conv_backward

MODES = ("exact", "float32", "int8")
_CL = torch.channels_last
# a saved input up to this size (as float32) gets its gradients in one oneDNN call, larger ones in
# spike_layers.CHUNK_BYTES chunks (bounded transients at large T*N)
WHOLE_BYTES = 64 << 20
# dL/dx alone (dL/dW event-driven): one oneDNN call up to this size, else row chunks. A whole call
# holds a second dL/dx-sized buffer inside oneDNN: at T=8 (bench net, 64 MiB) it set the step's
# peak (280 MiB); chunked, the transient is one chunk
WHOLE_INPUT_GRAD_BYTES = 32 << 20
# event-driven dL/dW below this firing rate: on the 128->128 3x3 conv (N=64, 32x32) it took 0.29x,
# 0.42x, 0.68x, 1.2x the dense oneDNN weight gradient at 5/10/20/30% firing (2-core Zen 5)
SPARSE_RATE = 0.2
# scan_state("auto") recomputes a conv's output in backward (instead of keeping the scan's float32 z)
# when the conv reads at most this many inputs per output (C_in/groups*kh*kw): a memory-bound conv
# such as an RGB stem (27) costs about one pass over its output. Bench net, T=4, N=16, interleaved
# CPU time per step (2-core Zen 5 under load): recomputing the stem only 0.99x keeping z, recomputing
# its 64- and 128-channel 3x3 convs too (fan-in 576, 1152) 1.28x
CHEAP_FAN_IN = 64
_local = threading.local()
_packs: dict = {}   # weight.data_ptr() -> (weakref(weight), key, (packed, scale, zero_points))
# storage data_ptr of a training conv's output -> (weakref(output), version, (input, weight, bias),
# (geometry, int8, size, stride)): what ``recompute`` needs to rebuild it in backward
_outputs: dict = {}


def conv_mode() -> str:
    """The training-conv mode of this thread (``spike_convs``)."""
    return getattr(_local, "mode", "exact")


@contextlib.contextmanager
def spike_convs(mode: str = "int8"):
    """Within this block (this thread), calls of a ``compact_spikes`` graph run their Conv2d
    layers in ``mode`` (module docstring)."""
    one_of("spike_convs", "mode", mode, MODES, ValueError)
    old = conv_mode()
    _local.mode = mode
    try:
        yield
    finally:
        _local.mode = old


@functools.lru_cache(maxsize=1)
def _int8_host() -> bool:
    from snnc.targets.spike_conv import int8_isa
    return int8_isa() is not None


def int8_error_bound(weight: torch.Tensor) -> torch.Tensor:
    """Per output channel: the most the int8 forward can differ from the exact conv on a 0/1
    input, without the fp32 rounding of the final scale (``stacked_int8``'s step/2 per weight)."""
    from snnc.targets.spike_conv import stacked_int8
    return weight[0].numel() * stacked_int8(weight)[2] / 2


def _int8_weight(weight, geometry, in_shape):
    """The prepacked stacked-digit weight, re-split only when the weight changed (an optimiser
    step bumps its version). Keyed by the weight's memory, not its Python object: a recomputing
    backward holds the weight as a saved tensor, another object on the same memory and version."""
    key = (weight._version, tuple(weight.shape), weight.stride(), tuple(in_shape), geometry)
    wid = weight.data_ptr()
    hit = _packs.get(wid)
    if hit is not None and hit[0]() is not None and hit[1] == key:
        return hit[2]
    from snnc.targets.spike_conv import stacked_int8
    digits, scale, _ = stacked_int8(weight)
    n, c, h, w = in_shape
    packed = torch.ops.onednn.qconv_prepack(digits, scale, 1.0, 0, *geometry, [n, 2 * c, h, w])

    def drop(ref):
        if wid in _packs and _packs[wid][0] is ref:
            del _packs[wid]
    _packs[wid] = (weakref.ref(weight, drop), key, (packed, scale, torch.zeros(scale.numel(), dtype=torch.int64)))
    return _packs[wid][2]


def _conv_forward(inp, weight, bias, geometry, int8):
    """The training conv's output from its saved input ``inp`` (the uint8 spikes, or the float
    input): int8 (``inp`` uint8) or channels_last fp32. The one forward of ``_TrainConv`` and of
    ``recompute``: deterministic kernels on the same values, so a recomputed output is
    bit-identical (0/1 spikes are exact in both dtypes; tested)."""
    if int8:
        from snnc.targets.spike_conv import stack_spikes
        packed, scale, zp = _int8_weight(weight, geometry, inp.shape)
        b = None if bias is None else bias.detach()
        return torch.ops.onednn.qconv2d_pointwise(stack_spikes(inp), 1.0, 0, packed, scale, zp, b, *geometry,
                                                  1.0, 0, torch.float32, "none", [], "")
    return torch.nn.functional.conv2d(inp.to(torch.float32).contiguous(memory_format=_CL), weight, bias, *geometry)


class _TrainConv(torch.autograd.Function):
    """conv2d in channels_last; with ``s8`` (the input's uint8 spikes) dL/dW reads those, and the
    forward is int8 when ``int8``."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, s8, int8):
        ctx.geometry, ctx.has_bias = geometry, bias is not None
        int8 = int8 and s8 is not None and _int8_host() and geometry[3] == 1
        y = _conv_forward(s8 if int8 else x, weight, bias, geometry, int8)
        # the input for dL/dW: the uint8 spikes (1 byte, exact) when there are any
        saved = x if s8 is None else s8
        ctx.save_for_backward(saved, weight)
        if spike_store.recompute_state() is None:   # no scan will ask for the recipe
            return y
        key = y.untyped_storage().data_ptr()
        _outputs[key] = (weakref.ref(y, lambda r, key=key: _forget(key, r)), y._version, (saved, weight, bias),
                         (geometry, int8, y.size(), y.stride()))
        return y

    @staticmethod
    def backward(ctx, grad_out):
        inp, weight = ctx.saved_tensors
        need_in, need_w, need_b = ctx.needs_input_grad[:3]
        grad_out = grad_out.contiguous(memory_format=_CL)
        lib = _sparse_weight_grad(inp, ctx.geometry) if need_w else None
        need_b = need_b and ctx.has_bias
        # (oneDNN's dL/db comes from its weight-gradient pass: with the event-driven dL/dW, a sum)
        dense = (need_w or need_b) and lib is None
        gi, gw, gb = conv_backward(grad_out, inp, weight.contiguous(memory_format=_CL), ctx.geometry,
                                   need_in, need_w and lib is None, need_b and lib is None,
                                   WHOLE_BYTES if dense else WHOLE_INPUT_GRAD_BYTES)
        if lib is not None:
            gw = native.spike_weight_grad(lib, inp, grad_out, weight.shape, ctx.geometry)
            gb = grad_out.sum((0, 2, 3)) if need_b else None
        if gw is not None and gw.stride() != weight.stride():   # dL/dW in the parameter's layout
            gw = torch.empty_like(weight).copy_(gw)            # (DDP buckets, optimiser state)
        return gi, gw, gb, None, None, None


def _forget(key, ref):
    entry = _outputs.get(key)
    if entry is not None and entry[0] is ref:
        del _outputs[key]


def recompute_recipe(t, cheap_only=False):
    """``(tensors, meta)`` from which ``recompute`` rebuilds ``t`` when ``t`` is (a view of) the
    output of a training conv, not written in place since, else None; with ``cheap_only`` only
    when that conv reads at most ``CHEAP_FAN_IN`` inputs per output. ``tensors`` are the conv's
    own saved input and its weight and bias (saving them again costs no memory)."""
    entry = _outputs.get(t.untyped_storage().data_ptr()) if isinstance(t, torch.Tensor) and t.numel() else None
    if entry is None or entry[0]() is None or t._version != entry[1] or t.dtype != torch.float32:
        return None
    if cheap_only and entry[2][1][0].numel() > CHEAP_FAN_IN:
        return None
    return entry[2], (*entry[3], t.size(), t.stride(), t.storage_offset())


def recompute(tensors, meta):
    """A fresh float32 tensor equal, bit for bit, to the conv output view that ``recompute_recipe``
    described (``_conv_forward`` again on the saved input)."""
    geometry, int8, size, stride, view_size, view_stride, offset = meta
    with torch.no_grad():
        y = _conv_forward(*tensors, geometry, int8)
    if y.stride() != stride:   # (oneDNN chose another output layout: same values, placed as before)
        y = torch.empty_strided(size, stride).copy_(y)
    return y.as_strided(view_size, view_stride, offset)


def _sparse_weight_grad(inp, geometry):
    """The native library when dL/dW should be summed event by event (``native.spike_weight_grad``):
    uint8 channels_last spikes of an ungrouped conv firing below ``SPARSE_RATE``, else None."""
    if inp.dtype != torch.uint8 or geometry[3] != 1 or not inp.is_contiguous(memory_format=_CL):
        return None
    lib = native.load()
    # count_nonzero, not sum: a uint8 sum promotes to an int64 copy of the whole input (512 MiB and
    # ~0.6 s for the bench net's [512, 128, 32, 32] channels_last spikes at T=32; this: no copy, 30 ms)
    if lib is None or int(torch.count_nonzero(inp)) >= SPARSE_RATE * inp.numel():
        return None
    return lib


def produced_here(output) -> bool:
    """Whether ``output`` comes from a training conv of this module (its backward is ours)."""
    return isinstance(getattr(output, "grad_fn", None), _TrainConv._backward_cls)


def _train_conv2d(x, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    if not (torch.is_grad_enabled() and isinstance(x, torch.Tensor) and x.dim() == 4
            and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and not isinstance(padding, str) and (x.requires_grad or weight.requires_grad)):
        return None
    geometry = (list(_pair(stride)), list(_pair(padding)), list(_pair(dilation)), int(groups))
    return _TrainConv.apply(x, weight, bias, geometry, spike_store.lookup(x), conv_mode() == "int8")


class ConvMode(TorchFunctionMode):
    """Routes ``torch.conv2d`` (what ``nn.Conv2d`` calls) to ``_TrainConv`` while a graph runs in
    a non-exact mode; pushed and popped by ``spike_store``'s graph hooks."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            out = _train_conv2d(*args, **kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)
