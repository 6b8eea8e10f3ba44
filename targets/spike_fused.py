"""Fused int8 spike blocks inside TVM for VNNI hosts without AMX: conv on 0/1 spikes + the neuron
scan over T in one kernel, spikes in and out as padded channels-last uint8.

Why (measured on the bench net, AMD Zen 5: AVX-512 VNNI, no AMX): the oneDNN int8 conv of
``spike_block`` is no faster there than TVM's own VNNI loop (``tvm_spike_conv``), and around it
each block paid for an fp32 conv output written by oneDNN into freshly allocated memory (one
page fault per 4 KiB: ~1/4 of the module's CPU time went to the kernel), read back by the neuron
kernel, plus a hand-off between torch's OpenMP pool and TVM's. Here one TVM kernel does it all
(the block's race still decides, per layer, by timing):

    for (n, 16 out-channels, output row y) in parallel:       # as tvm_spike_conv.conv_kernel
      for each group of R output columns:
        for t in 0..T-1:                                        # the neuron's time loop, inside
          acc[digit][R] = sum_{c4, ry, rx} vpdpbusd(spikes[t, n, y+ry, x+rx, 4 channels], Wq[digit])
          I = s0 * acc[0] + s1 * acc[1] + bias                  # the conv output, never stored
          V = charge(t == 0 ? v_init : reset(V), I); spike = fire(V)   # tvm_kernels._rule, bit for bit
          write spike (uint8 into the next block's padded input, or fp32)

The membrane lives in registers across T, the conv output is never stored, and nothing is
allocated per call. Numbers: the weights are ``tvm_spike_conv.pack_weights``' two int8 digits
(``spike_conv.split_int8``), accumulated exactly in int32, so every conv output is within the
bound stated there (``k * max|w_c| / 64516`` + fp32 rounding; ``FusedKernel.error_bound``);
spikes can differ from fp32 only where the membrane lies within that bound (accumulated over the
steps) of the threshold (tests/test_spike_fused.py checks exactly that against float64). The
analog variant (first layer) computes in fp32 and differs from oneDNN by summation order only.

Spike format ``u8pad``: ``[T, N, H + 2p, W + 2p, C]`` uint8 0/1, channels last, with the zero
border the next conv's padding ``p`` reads (written once, when the buffer is made); reinterpreted
as int32 it is 4 channels per word, the operand ``vpdpbusd`` broadcasts.
"""
from __future__ import annotations

import torch
import tvm
from tvm.script import tirx as T

from .tvm_kernels import NeuronScan, _rule, pick_lanes
from .tvm_spike_conv import DIGITS, LANES, _dot, _reg_cols, pack_weights

TVM_ALIGNMENT = 64  # bytes: TIR buffers default to data_alignment=64


def aligned(x: torch.Tensor) -> torch.Tensor:
    """``x`` contiguous and 64-byte aligned, copying only when it is not.

    Every TVM function here is compiled for buffers with TIR's default ``data_alignment=64``, so
    LLVM emits aligned vector loads (``vmovaps``). tvm-ffi hands a torch tensor's pointer to the
    kernel without checking that (only ``tvm.runtime.from_dlpack`` checks), and a batch slice such
    as ``x_test[:1]`` may start 16 or 48 bytes past a 64-byte boundary: the kernel then dies with
    SIGSEGV. Torch's own allocations are 64-byte aligned, so only views pay for the copy."""
    x = x.contiguous()
    if x.data_ptr() % TVM_ALIGNMENT:
        x = x.clone(memory_format=torch.contiguous_format)
    return x


# int8 ISAs (``spike_conv.int8_isa``) where blocks race the fused kernel: VNNI without AMX (with
# AMX-INT8, oneDNN's tile kernels are the faster conv, and the fused kernel is not built)
FUSED_ISAS = ("avx512_vnni",)


def fused_applies(conv, in_shape, binary: bool = True) -> bool:
    """Whether the fused kernel takes ``conv`` on ``in_shape`` ``[B, C, H, W]``: ungrouped,
    undilated, stride 1, symmetric zero padding given as a number, C_out a multiple of 16 (one
    zmm of output channels) and, on spikes, C of 4 (whole int32 words per pixel)."""
    return (conv.groups == 1 and tuple(conv.dilation) == (1, 1) and tuple(conv.stride) == (1, 1)
            and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.padding[0] == conv.padding[1] and (in_shape[1] % 4 == 0 or not binary)
            and conv.out_channels % LANES == 0)


def fused_block_kernel(C: int, O: int, H: int, W: int, KH: int, KW: int, pad: int, steps: int, p: NeuronScan,
                       out_format: str, out_pad: int = 0, analog: bool = False, isa: str = "vnni",
                       dtype: str = "float32", digits: int = DIGITS):
    """PrimFunc ``(P[T, N, H+2p, W+2p, C/4] int32, Wq, S[2, O], B[O], out)`` (module docstring);
    ``out``: ``"u8pad"`` -> uint8 ``[T, N, Ho+2q, Wo+2q, O]`` (interior only; q = ``out_pad``),
    ``"f32"`` -> ``[T, N, Ho, Wo, O]`` in ``dtype``. N is symbolic.

    ``analog=True``: the same loop for a conv on any fp32 input (the first layer of a net),
    ``(X[T, N, C, H, W] fp32, Wf[O/16, C, KH, KW, 16] fp32, S, B[O], out)`` with fp32 FMAs on
    16 output channels x R columns: fp32 results, summed in another order than oneDNN's (they
    differ by fp32 rounding, not bit for bit). X is the caller's tensor as it comes: a first
    parallel loop writes it padded channels-last into TVM's workspace. Why here and not in torch
    (measured, bench net N=16 on the 2-core Zen 5 host, under load): the torch copy into a padded
    buffer cost more than the conv kernel itself (18.3 vs 6.9 ms for copy + kernel against this
    kernel), because after any parallel torch op its OpenMP threads spin-wait on the cores TVM's
    pool is about to use."""
    if p.v_th == "buffer":
        raise ValueError("fused_block_kernel: scalar thresholds only")
    N, Hp, Wp = tvm.tirx.Var("n", "int64"), H + 2 * pad, W + 2 * pad
    Ho, Wo = Hp - KH + 1, Wp - KW + 1
    D = 1 if analog else digits
    O16, R = O // LANES, _reg_cols(Wo, 16 if D == 1 else 8)   # D x R accumulators: 16 zmm
    XO = Wo // R
    charge, fire, reset = _rule(p, dtype)
    init = T.Cast(dtype, p.v_init)
    q = out_pad if out_format == "u8pad" else 0
    out_shape = (steps, N, Ho + 2 * q, Wo + 2 * q, O)
    out_dtype = "uint8" if out_format == "u8pad" else dtype
    acc_dtype = dtype if analog else "int32"
    in_shape, in_dtype = ((steps, N, Hp, Wp, C), dtype) if analog else ((steps, N, Hp, Wp, C // 4), "int32")
    w_shape, w_dtype = ((O16, C, KH, KW, LANES), dtype) if analog else ((D, O16, C // 4, KH, KW, 64), "int8")

    def current(acc, S, B, f, xi, fi):  # the conv output of one neuron: digits scaled, + bias
        if analog:
            return acc[xi * LANES + fi] + B[f]
        if D == 1:
            return T.Cast(dtype, acc[xi * LANES + fi]) * S[0, f] + B[f]
        return (T.Cast(dtype, acc[xi * LANES + fi]) * S[0, f] + T.Cast(dtype, acc[(R + xi) * LANES + fi]) * S[1, f]
                + B[f])

    def accumulate(acc, P, Wq, t, n, fo, y, x, c, ry, rx, d, xi):
        a = acc[T.ramp((d * R + xi) * LANES, 1, LANES)]
        if analog:
            return a + T.broadcast(P[t, n, y + ry, x + rx, c], LANES) * Wq[fo, c, ry, rx, T.ramp(0, 1, LANES)]
        return _dot(isa, a, P[t, n, y + ry, x + rx, c], Wq[d, fo, c, ry, rx, T.ramp(0, 1, 64)])

    @T.prim_func(s_tir=True, check_well_formed=False)
    def fused_block(p_: T.handle, wq: T.handle, sc: T.handle, bi: T.handle, s: T.handle):
        T.func_attr({"tir.noalias": True})
        Wq = T.match_buffer(wq, w_shape, w_dtype)
        S = T.match_buffer(sc, (D, O), "float32")
        B = T.match_buffer(bi, (O,), "float32")
        Out = T.match_buffer(s, out_shape, out_dtype)
        if analog:  # the caller's [T, N, C, H, W], padded channels-last into TVM's workspace here
            X = T.match_buffer(p_, (steps, N, C, H, W), dtype)
            P = T.alloc_buffer(in_shape, dtype)
        else:
            P = T.match_buffer(p_, in_shape, in_dtype)
        with T.sblock("root"):
            if analog:
                for row in T.parallel(steps * N * Hp):
                    for xx, c in T.grid(Wp, C):
                        P[row // (N * Hp), row // Hp % N, row % Hp, xx, c] = T.if_then_else(
                            pad <= row % Hp and row % Hp < H + pad and pad <= xx and xx < W + pad,
                            X[row // (N * Hp), row // Hp % N, c, row % Hp - pad, xx - pad], T.Cast(dtype, 0))
            for nfy in T.parallel(N * O16 * Ho):
                for xo in range(XO):
                    acc = T.alloc_buffer((D * R * LANES,), acc_dtype, scope="local")
                    V = T.alloc_buffer((R * LANES,), dtype, scope="local")
                    for t in range(steps):
                        for i in T.unroll(D * R):
                            acc[T.ramp(i * LANES, 1, LANES)] = T.broadcast(T.Cast(acc_dtype, 0), LANES)
                        for c in range(in_shape[-1]):
                            for ry in range(KH):
                                for rx in range(KW):
                                    for d in T.unroll(D):
                                        for xi in T.unroll(R):
                                            acc[T.ramp((d * R + xi) * LANES, 1, LANES)] = accumulate(
                                                acc, P, Wq, t, nfy // (O16 * Ho), nfy // Ho % O16, nfy % Ho,
                                                xo * R + xi, c, ry, rx, d, xi)
                        for xi in T.unroll(R):
                            for fi in T.vectorized(LANES):
                                V[xi * LANES + fi] = charge(
                                    T.Select(t == 0, init, reset(V[xi * LANES + fi], 0)),
                                    current(acc, S, B, nfy // Ho % O16 * LANES + fi, xi, fi), 0)
                            for fi in T.vectorized(LANES):
                                Out[t, nfy // (O16 * Ho), nfy % Ho + q, xo * R + xi + q,
                                    nfy // Ho % O16 * LANES + fi] = T.Cast(out_dtype, fire(V[xi * LANES + fi], 0))
    return fused_block


def padded_scan_kernel(C: int, H: int, W: int, pad: int, p: NeuronScan, dtype: str = "float32"):
    """PrimFunc ``(Y[G, N*H*W, C], V[N*H*W, C], S[G, N, H+2p, W+2p, C] uint8, first)``: the neuron
    scan of ``spike_block.block_scan_kernel`` (same expressions) writing the ``u8pad`` format, for
    a block whose conv is not the fused kernel (e.g. the first, analog-input conv)."""
    if p.v_th == "buffer":
        raise ValueError("padded_scan_kernel: scalar thresholds only")
    lanes = pick_lanes(C)
    charge, fire, reset = _rule(p, dtype)
    init = T.Cast(dtype, p.v_init)
    G, N, HW = tvm.tirx.Var("G", "int64"), tvm.tirx.Var("n", "int64"), H * W

    @T.prim_func(s_tir=True)
    def padded_scan(y: T.handle, v: T.handle, s: T.handle, first: T.int32):
        T.func_attr({"tir.noalias": True})
        Y = T.match_buffer(y, (G, N * HW, C), dtype)
        V = T.match_buffer(v, (N * HW, C), dtype)
        S = T.match_buffer(s, (G, N, H + 2 * pad, W + 2 * pad, C), "uint8")
        with T.sblock("root"):
            for r in T.parallel(N * HW):
                for co in T.serial(C // lanes):
                    for t in T.serial(G):
                        for ci in T.vectorized(lanes):
                            V[r, co * lanes + ci] = charge(
                                T.Select(tvm.tirx.all(t == 0, first == 1), init, reset(V[r, co * lanes + ci], 0)),
                                Y[t, r, co * lanes + ci], 0)
                        for ci in T.vectorized(lanes):
                            S[t, r // HW, r % HW // W + pad, r % W + pad, co * lanes + ci] = T.Cast(
                                "uint8", fire(V[r, co * lanes + ci], 0))
    return padded_scan


def padded_spikes(shape, pad: int, dtype=torch.uint8) -> torch.Tensor:
    """A zeroed padded channels-last buffer for ``[T, N, C, H, W]``: ``u8pad`` spikes (C rounded up
    to whole int32 words), or any dtype's padded channels-last copy (``to_padded``)."""
    steps, n, c, h, w = shape
    c = -(-c // 4) * 4 if dtype == torch.uint8 else c
    return torch.zeros(steps, n, h + 2 * pad, w + 2 * pad, c, dtype=dtype)


def to_padded(x: torch.Tensor, pad: int, out: torch.Tensor) -> torch.Tensor:
    """``x`` ``[T, N, C, H, W]`` (any memory order) written into the padded buffer ``out`` (whose
    border and extra channels stay zero): the input of a fused block whose producer writes
    another format."""
    c, h, w = x.shape[2:]
    out[:, :, pad:pad + h, pad:pad + w, :c] = x.permute(0, 1, 3, 4, 2)
    return out


class FusedKernel:
    """The kernel operands of one fused block (torch tensors) and its stated bound.

    On spikes: ``tvm_spike_conv.pack_weights``' int8 digits (two, or one where ``digits=1``:
    ``spike_digits``), their scales and the bias; ``error_bound[c]`` per output channel: ``k * s_c /
    (2 * 254)`` with two digits, ``spike_digits.one_digit``'s bound with one; ``bound``: the bound
    to state instead, for weights rounded to one digit before (against the weights before rounding). Analog input: the fp32
    weights as ``[O/16, C, KH, KW, 16]``, a dummy scale, the bias; no bound beyond fp32 rounding
    (``error_bound`` None)."""

    def __init__(self, conv, binary: bool = True, digits: int = DIGITS, bound=None):
        self.analog, self.digits = not binary, (None if not binary else digits)
        if self.analog:
            o, c, kh, kw = conv.weight.shape
            w = conv.weight.detach().float().reshape(o // LANES, LANES, c, kh, kw).permute(0, 2, 3, 4, 1)
            bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(o)
            self.wq, self.scales, self.bias = w.contiguous(), torch.ones(1, o), bias.clone()
            self.error_bound = None
            return
        wq, scales, bias, packed_bound = pack_weights(conv, digits)
        # copies in torch's 64-byte aligned memory: the kernel's loads assume TIR's data_alignment
        # (numpy's buffers are only 16-byte aligned: aligned loads from them fault)
        self.wq, self.scales, self.bias = (torch.from_numpy(a).clone() for a in (wq, scales, bias))
        self.error_bound = torch.as_tensor(packed_bound if bound is None else bound, dtype=torch.float32)
