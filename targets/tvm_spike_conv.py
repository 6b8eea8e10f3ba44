"""Spike-input convolutions of the exported ``tvm:llvm`` library in int8, inside TVM (AVX-512 VNNI).

Every conv after the first reads 0/1 spikes (``spike_conv.binary_input``). 0 and 1 are exact in
uint8, so ``uint8 spikes x int8 weights -> int32`` is exact; the weights are the only
approximation. They are split into two int8 digits per output channel with ``spike_conv.
split_int8`` (w_c ~ s_c*q0 + (s_c/254)*q1, s_c = max|w_c|/127), and the bound is the one stated
there: for any 0/1 input, per output channel c,

    |y_int8 - y_exact| <= k * s_c / (2 * 254) + fp32 rounding of  s_c*acc0 + (s_c/254)*acc1 + b_c

with k = C_in * KH * KW (``error_bound``): about k * max|w_c| * 1.55e-5 worst case.

Kernel (TVM's x86 ``conv2d_NCHWc_int8`` loop structure, Liu et al. 2019, with the 16x4 VNNI dot
product of ``tvm.s_tir.tensor_intrin.x86``): spikes are packed 4 input channels per int32 lane,
``P[n, C/4, H+2p, W+2p]`` (zero padding written by the pack: no separate pad copy), weights as
``Wq[digit, O/16, C/4, KH, KW, 16 out x 4 in]`` int8 (one zmm per step), and

    for (n, f_outer, y) in parallel:
      for x_outer:
        acc[digit][R columns] = 0                         # 2 x R int32x16 registers
        for c4, ry, rx:  for digit:  w = Wq[digit, f_outer, c4, ry, rx]      (64 bytes)
          for xi in unroll(R):  acc[digit][xi] = vpdpbusd(acc, broadcast(P[n, c4, y+ry, x+xi+rx]), w)
        out[n, f, y, x] = s0[f] * acc[0] + s1[f] * acc[1] + bias[f]           (fp32, NCHW)

``vpdpbusd`` does 64 multiply-adds per instruction (fp32 FMA: 16), so two digits still do half
the instructions of the fp32 kernel. Without VNNI but with AVX-512BW the same loop uses
``vpmaddubsw`` + ``vpmaddwd``: their int16 pair sums are at most 2*127 for 0/1 inputs, so they
never saturate and stay exact. Without either, or with ``isa="fp32"``, the fp32 schedule of
``tvm_schedule.py`` runs. With AMX-INT8 (and the kernel's permission for the tile state) the
convs that fit a tile (64k in-channels, 16k output columns, stride 1) run on AMX tiles
(``amx_conv_kernel``: 16x16x64 int8 products per ``tdpbusd``), the rest on VNNI; integer
results are identical on both (tested), so the choice never changes outputs.
"""
from __future__ import annotations


import numpy as np
import torch
import tvm
from tvm.script import tirx as T

from snnc.errors import SnncError, one_of

from .spike_conv import split_int8

LANES = 16   # out-channels per zmm (int32 x 16)
DIGITS = 2   # int8 digits per weight (spike_conv's bound: k * max|w_c| * 1.55e-5)
ISAS = ("auto", "amx", "vnni", "avx512bw", "fp32")
AMX_MATTR = ["+amx-tile", "+amx-int8"]  # LLVM features the AMX kernel is compiled with


def host_int8_isa(features) -> str:
    """The int8 kernel this host runs: ``amx`` (AMX-INT8 tiles, with VNNI for the convs that do
    not fit a tile; needs the kernel's AMX permission too), ``vnni`` (AVX-512 VNNI),
    ``avx512bw`` or ``fp32``."""
    feats = set(features)
    if {"amx_tile", "amx_int8", "avx512_vnni"} <= feats and amx_permission():
        return "amx"
    if "avx512_vnni" in feats:
        return "vnni"
    if "avx512bw" in feats:
        return "avx512bw"
    return "fp32"


def isa_choice(requested: str, features) -> str:
    """The kernel kind for ``requested`` (one of ``ISAS``) on a host with ``features``."""
    one_of("tvm:llvm", "spike_convs", requested, ISAS, SnncError)
    have = host_int8_isa(features)
    if requested == "auto":
        return have
    order = ("fp32", "avx512bw", "vnni", "amx")
    if order.index(requested) > order.index(have):
        raise SnncError(f"tvm:llvm: spike_convs={requested!r} needs a CPU (and kernel) with {_NEEDS[requested]}; "
                        f"this one has {have!r} at best")
    return requested


def applies(conv) -> bool:
    """Whether ``conv`` (an ``nn.Conv2d``) fits the int8 kernel: ungrouped, undilated, zero padding
    given as numbers, out-channels a multiple of 16."""
    return (conv.groups == 1 and tuple(conv.dilation) == (1, 1) and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and conv.out_channels % LANES == 0)


def _reg_cols(w_out: int, widest: int = 8) -> int:
    """Register tile width: the largest divisor of the output width up to ``widest`` (2 digits x 8
    columns = 16 accumulators, leaving zmm registers for the weights)."""
    return next(r for r in range(min(widest, w_out), 0, -1) if w_out % r == 0)


def pack_weights(conv, digits: int = DIGITS):
    """``(Wq [D, O/16, C4, KH, KW, 64] int8, scales [D, O] fp32, bias [O] fp32, error_bound [O])``,
    D = ``digits``: two (``split_int8``) or one (``spike_digits.one_digit``: balanced rounding)."""
    O, C, KH, KW = conv.weight.shape
    C4 = -(-C // 4)
    if digits == 1:
        from .spike_digits import one_digit
        q, scales, bound = one_digit(conv.weight)
        d = q.reshape(1, O, C, KH, KW)
    else:
        q, scales, last = split_int8(conv.weight, digits)
        d = q.reshape(digits, O, C, KH, KW).to(torch.int8)
        bound = C * KH * KW * last / 2
    d = torch.nn.functional.pad(d, (0, 0, 0, 0, 0, C4 * 4 - C))            # C -> 4*C4, zero weights
    d = d.reshape(digits, O // LANES, LANES, C4, 4, KH, KW).permute(0, 1, 3, 5, 6, 2, 4)
    wq = d.contiguous().reshape(digits, O // LANES, C4, KH, KW, LANES * 4)
    bias = conv.bias.detach().float() if conv.bias is not None else torch.zeros(O)
    return wq.numpy(), scales.reshape(digits, O).numpy(), bias.numpy().astype(np.float32), bound


def as_two_digits(wq: np.ndarray, scales: np.ndarray):
    """A one-digit ``pack_weights`` result in the two-digit layout the library kernels take: a zero
    second digit with scale 0, so they compute ``s*acc + 0*0 + b``, the same fp32 value as the
    one-digit kernel's ``s*acc + b``."""
    if wq.shape[0] == DIGITS:
        return wq, scales
    return np.concatenate([wq, np.zeros_like(wq)]), np.concatenate([scales, np.zeros_like(scales)])


def _batch(n):
    return n if n is not None else tvm.tirx.Var("n", "int64")


def pack_kernel(C: int, H: int, W: int, pad: int, n: int | None = None):
    """PrimFunc ``(X[n, C, H, W] fp32 0/1, P[n, C4, H+2p, W+2p] int32)``: 4 channels per int32
    (channel 4g+j in byte j), zero border and zero channels past C."""
    N, C4, Hp, Wp = _batch(n), -(-C // 4), H + 2 * pad, W + 2 * pad

    def byte(X, b, c, y, x, j):
        inside = tvm.tirx.all(y >= pad, y < H + pad, x >= pad, x < W + pad, c < C)
        return T.if_then_else(inside, T.shift_left(T.Cast("int32", X[b, T.min(c, C - 1), y - pad, x - pad]), 8 * j), 0)

    @T.prim_func(s_tir=True)
    def spike_pack(x: T.handle, p: T.handle):
        T.func_attr({"tir.noalias": True})
        X = T.match_buffer(x, (N, C, H, W), "float32")
        P = T.match_buffer(p, (N, C4, Hp, Wp), "int32")
        with T.sblock("root"):
            for bg in T.parallel(N * C4):
                for y in range(Hp):
                    for xx in range(Wp):
                        P[bg // C4, bg % C4, y, xx] = (
                            byte(X, bg // C4, bg % C4 * 4, y, xx, 0) | byte(X, bg // C4, bg % C4 * 4 + 1, y, xx, 1)
                            | byte(X, bg // C4, bg % C4 * 4 + 2, y, xx, 2) | byte(X, bg // C4, bg % C4 * 4 + 3, y, xx, 3))
    return spike_pack


def _dot(isa, acc, a32, w):
    """acc (int32x16) += 16 dot products of 4 uint8 spikes (``a32``, broadcast) with 4 int8 weights."""
    if isa == "vnni":
        # LLVM >= 17 types the operands as bytes: (<16 x i32>, <64 x i8>, <64 x i8>)
        return T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.vpdpbusd.512", acc,
                                       T.reinterpret("int8x64", T.broadcast(a32, 16)), w)
    a8 = T.reinterpret("uint8x64", T.broadcast(a32, 16))
    pairs = T.call_llvm_pure_intrin("int16x32", "llvm.x86.avx512.pmaddubs.w.512", a8, w)
    return acc + T.call_llvm_pure_intrin("int32x16", "llvm.x86.avx512.pmaddw.d.512", pairs,
                                         T.broadcast(T.int16(1), 32))


def conv_kernel(C: int, O: int, H: int, W: int, KH: int, KW: int, stride: int, pad: int, isa: str = "vnni",
                n: int | None = None, digits: int = DIGITS):
    """PrimFunc ``(P, Wq, S[D, O], B[O], Y[n, O, Ho, Wo] fp32)`` (module docstring), D = ``digits``."""
    N, C4, Hp, Wp = _batch(n), -(-C // 4), H + 2 * pad, W + 2 * pad
    Ho, Wo = (Hp - KH) // stride + 1, (Wp - KW) // stride + 1
    D = digits
    O16, R = O // LANES, _reg_cols(Wo, 16 if D == 1 else 8)   # D x R accumulators: 16 zmm

    def value(acc, S, B, f, xi, fi):   # the fp32 output: the digits scaled, + bias
        if D == 1:
            return T.Cast("float32", acc[xi * 16 + fi]) * S[0, f] + B[f]
        return (T.Cast("float32", acc[xi * 16 + fi]) * S[0, f] + T.Cast("float32", acc[(R + xi) * 16 + fi]) * S[1, f]
                + B[f])
    XO = Wo // R

    @T.prim_func(s_tir=True)
    def spike_conv2d(p: T.handle, wq: T.handle, sc: T.handle, bi: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True})
        P = T.match_buffer(p, (N, C4, Hp, Wp), "int32")
        Wq = T.match_buffer(wq, (D, O16, C4, KH, KW, 64), "int8")
        S = T.match_buffer(sc, (D, O), "float32")
        B = T.match_buffer(bi, (O,), "float32")
        Y = T.match_buffer(y, (N, O, Ho, Wo), "float32")
        with T.sblock("root"):
            for nfy in T.parallel(N * O16 * Ho):
                for xo in range(XO):
                    acc = T.alloc_buffer((D * R * 16,), "int32", scope="local")
                    for i in T.unroll(D * R):
                        acc[T.ramp(i * 16, 1, 16)] = T.broadcast(T.int32(0), 16)
                    for c4 in range(C4):
                        for ry in range(KH):
                            for rx in range(KW):
                                for d in T.unroll(D):
                                    for xi in T.unroll(R):
                                        acc[T.ramp((d * R + xi) * 16, 1, 16)] = _dot(
                                            isa, acc[T.ramp((d * R + xi) * 16, 1, 16)],
                                            P[nfy // (O16 * Ho), c4, nfy % Ho * stride + ry,
                                              (xo * R + xi) * stride + rx],
                                            Wq[d, nfy // Ho % O16, c4, ry, rx, T.ramp(0, 1, 64)])
                    for xi in T.unroll(R):
                        for fi in range(16):
                            Y[nfy // (O16 * Ho), nfy // Ho % O16 * 16 + fi, nfy % Ho, xo * R + xi] = value(
                                acc, S, B, nfy // Ho % O16 * 16 + fi, xi, fi)
    return spike_conv2d


# --- AMX-INT8 ------------------------------------------------------------------------------------

def amx_applies(C: int, W_out: int, stride: int) -> bool:
    """The AMX tile kernel needs 64 input channels per tile row, 16 output columns per tile and
    contiguous columns (stride 1); other spike convs use the VNNI kernel."""
    return C % 64 == 0 and W_out % 16 == 0 and stride == 1


def amx_weights(wq: np.ndarray) -> np.ndarray:
    """The A tiles of ``amx_conv_kernel`` from ``pack_weights``' ``Wq``: uint8 digits + 128 (AMX
    multiplies unsigned A by signed B, so the weights carry the offset and the spikes are B),
    ``[D, O/16, C/64, KH, KW, 16 out, 64 in]`` (one 1 KiB tile per step)."""
    D, O16, C4, KH, KW, _ = wq.shape
    w = wq.reshape(D, O16, C4 // 16, 16, KH, KW, 16, 4).astype(np.int16) + 128
    return np.ascontiguousarray(w.transpose(0, 1, 2, 4, 5, 6, 3, 7).reshape(D, O16, C4 // 16, KH, KW, 16, 64)
                                .astype(np.uint8))


def _tile(name, *args):
    return T.call_llvm_intrin("void", f"llvm.x86.{name}", *args)


def amx_conv_kernel(C: int, O: int, H: int, W: int, KH: int, KW: int, pad: int, n: int | None = None):
    """PrimFunc ``(P, Wa, S[D, O], B[O], Y)``: the spike conv on AMX tiles (stride 1).

    C tile [16 out-channels x 16 columns] += A [16 out x 64 in-channels] (weight digit + 128,
    uint8) . B [16 channel groups x (16 columns x 4 channels)] (spikes, the VNNI pack's rows:
    P[n, g, y+ry, x:x+16] is 64 contiguous bytes, row stride Hp*Wp*4). The +128 offset adds
    128 * (active inputs in the window), counted by a third product with an all-ones A tile and
    subtracted exactly in int32. Tiles: 0, 1 = digit accumulators, 2 = count, 3 = ones,
    4, 5 = weight digits, 6 = spikes. Output rows are out-channels, so the fp32 epilogue stores
    16 contiguous columns per vector (no transpose). Each parallel task loads the tile
    configuration first (it is per thread); the process must hold the AMX permission
    (``amx_permission``)."""
    N, C4, Hp, Wp = _batch(n), C // 4, H + 2 * pad, W + 2 * pad
    Ho, Wo = Hp - KH + 1, Wp - KW + 1
    O16, CB, D, XO = O // LANES, C // 64, DIGITS, Wo // 16

    @T.prim_func(s_tir=True)
    def spike_conv2d_amx(p: T.handle, wa: T.handle, sc: T.handle, bi: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True})
        P = T.match_buffer(p, (N, C4, Hp, Wp), "int32")
        Wa = T.match_buffer(wa, (D, O16, CB, KH, KW, 16, 64), "uint8")
        S = T.match_buffer(sc, (D, O), "float32")
        B = T.match_buffer(bi, (O,), "float32")
        Y = T.match_buffer(y, (N, O, Ho, Wo), "float32")
        with T.sblock("root"):
            for nfy in T.parallel(N * O16 * Ho):
                cfg = T.alloc_buffer((64,), "uint8", scope="local")
                ones = T.alloc_buffer((1024,), "uint8", scope="local")
                acc = T.alloc_buffer((768,), "int32", scope="local")
                for i in T.vectorized(64):
                    cfg[i] = T.uint8(0)
                cfg[0] = T.uint8(1)          # palette 1; every tile 16 rows x 64 bytes
                for t in range(8):
                    cfg[16 + 2 * t] = T.uint8(64)
                    cfg[48 + t] = T.uint8(16)
                for i in T.vectorized(1024):
                    ones[i] = T.uint8(1)
                _tile("ldtilecfg", T.address_of(cfg[0]))
                _tile("tileloadd64", T.int8(3), T.address_of(ones[0]), T.int64(64))
                for xo in range(XO):
                    for t in T.unroll(3):
                        _tile("tilezero", T.int8(t))
                    for cb in range(CB):
                        for ry in range(KH):
                            for rx in range(KW):
                                _tile("tileloadd64", T.int8(6),
                                      T.address_of(P[nfy // (O16 * Ho), cb * 16, nfy % Ho + ry, xo * 16 + rx]),
                                      T.int64(Hp * Wp * 4))
                                for d in T.unroll(D):
                                    _tile("tileloadd64", T.int8(4 + d),
                                          T.address_of(Wa[d, nfy // Ho % O16, cb, ry, rx, 0, 0]), T.int64(64))
                                    _tile("tdpbusd", T.int8(d), T.int8(4 + d), T.int8(6))
                                _tile("tdpbusd", T.int8(2), T.int8(3), T.int8(6))
                    for t in T.unroll(3):
                        _tile("tilestored64", T.int8(t), T.address_of(acc[t * 256]), T.int64(64))
                    for r in range(16):
                        for i in T.vectorized(16):
                            Y[nfy // (O16 * Ho), nfy // Ho % O16 * 16 + r, nfy % Ho, xo * 16 + i] = (
                                T.Cast("float32", acc[r * 16 + i] - acc[512 + i] * 128)
                                * S[0, nfy // Ho % O16 * 16 + r]
                                + T.Cast("float32", acc[256 + r * 16 + i] - acc[512 + i] * 128)
                                * S[1, nfy // Ho % O16 * 16 + r]
                                + B[nfy // Ho % O16 * 16 + r])
                _tile("tilerelease")
    return spike_conv2d_amx


_AMX_GRANTED = []


def amx_permission() -> bool:
    """Ask Linux for the AMX tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)``,
    needed once per process before any tile instruction); True when granted."""
    if not _AMX_GRANTED:
        import ctypes
        try:
            ok = ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18) == 0
        except (OSError, AttributeError):
            ok = False
        _AMX_GRANTED.append(ok)
    return _AMX_GRANTED[0]


# --- Relax lowering: the importer's nn.Conv2d converter, int8 where the input is spikes ----------

def install(imp, gm, isa: str) -> None:
    """Make TVM's torch importer ``imp`` lower every ``nn.Conv2d`` of ``gm`` whose input is 0/1
    spikes (and that ``applies``) to the pack + int8 conv kernels above; others keep the
    importer's own converter (fp32, ``tvm_schedule.py``). ``isa="fp32"``: leave all of them.
    Convs named in ``gm.snnc_spike_digits`` (module targets, ``spike_digits.choose``) get one
    weight digit, as in the hybrid module."""
    if isa == "fp32":
        return
    from torch import nn

    from .spike_conv import binary_input
    original = imp.convert_map[nn.Conv2d]

    def convert(node):
        conv = imp.named_modules[node.target]
        if type(conv) is nn.Conv2d and applies(conv) and binary_input(gm, node):
            return _emit(imp, conv, imp.env[node.args[0]], isa,
                         1 if node.target in getattr(gm, "snnc_spike_digits", ()) else DIGITS)
        return original(node)
    imp.convert_map[nn.Conv2d] = convert


def _emit(imp, conv, x, isa, digits=DIGITS):
    from tvm import relax

    from .tvm_lower import opaque
    dims = [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in x.ty.shape.values]
    B, C, H, W = dims
    O, _, KH, KW = conv.weight.shape
    (sy, sx), (py, px) = conv.stride, conv.padding
    if sy != sx or py != px:
        raise SnncError(f"spike int8 conv: stride {conv.stride} / padding {conv.padding} must be square")
    n = B if isinstance(B, int) else None
    C4, Hp, Wp = -(-C // 4), H + 2 * py, W + 2 * py
    Ho, Wo = (Hp - KH) // sy + 1, (Wp - KW) // sy + 1
    wq, scales, bias, _ = pack_weights(conv, digits)
    bb = imp.block_builder
    pack = bb.add_func(opaque(pack_kernel(C, H, W, py, n)), "spike_pack")
    packed = bb.emit(relax.call_tir(pack, [x], relax.TensorType((B, C4, Hp, Wp), "int32")))
    if isa == "amx" and amx_applies(C, Wo, sy):
        kern = bb.add_func(opaque(amx_conv_kernel(C, O, H, W, KH, KW, py, n)), "spike_conv2d_amx")
        wq, scales = as_two_digits(wq, scales)   # the tile kernel takes two digits (one of them zero here)
        wq = amx_weights(wq)
    else:
        isa = "vnni" if isa == "amx" else isa
        kern = bb.add_func(opaque(conv_kernel(C, O, H, W, KH, KW, sy, py, isa, n, digits)),
                           f"spike_conv2d_{isa}" + ("_d1" if digits == 1 else ""))
    args = [packed, relax.const(wq), relax.const(scales), relax.const(bias)]
    return bb.emit(relax.call_tir(kern, args, relax.TensorType((B, O, Ho, Wo), "float32")))


def error_bounds(gm) -> dict:
    """Per int8 conv of ``gm`` (by module name): the ``[O]`` bound of the module docstring."""
    from torch import nn

    from .spike_conv import binary_input
    out = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            conv = gm.get_submodule(node.target)
            if type(conv) is nn.Conv2d and applies(conv) and binary_input(gm, node):
                out[node.target] = torch.as_tensor(pack_weights(conv)[3])
    return out


def spike_kernels(requested: str, tdict: dict) -> str:
    """The int8 kernel ISA of a ``tvm:llvm`` build for target dict ``tdict``: ``requested`` checked
    against this host (``isa_choice``); "auto" is "fp32" unless the library is built for this
    host's CPU (``mcpu`` "host": a portable export must not contain VNNI instructions)."""
    from .tvm_build import host_isa
    host = host_isa()
    if requested == "auto" and tdict.get("mcpu") != host["cpu"]:
        return isa_choice("fp32", host["features"])
    return isa_choice(requested, host["features"])


_NEEDS = {"amx": "amx_int8", "vnni": "avx512_vnni", "avx512bw": "avx512bw"}


def check_loadable(meta: dict, path) -> None:
    """Refuse (naming the file) a library whose int8 kernels this CPU cannot execute: running it
    would die on an illegal instruction instead of raising."""
    from .tvm_build import host_isa
    need = _NEEDS.get(meta.get("spike_convs", "fp32"))
    if need and (need not in host_isa()["features"] or (need == "amx_int8" and not amx_permission())):
        raise SnncError(f"{path}: built with {meta['spike_convs']} int8 spike convolutions, which this CPU "
                        f"lacks ({need}); rebuild it here with spike_convs='fp32' or 'auto'")
