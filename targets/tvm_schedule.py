"""Hand CPU schedules for the standalone ``tvm:llvm`` Relax module (no tuning, no offload library).

This TVM wheel has no x86 TOPI schedules and dlight's CPU rules do not match convolutions, so a
legalized ``conv2d_nchw`` is a single-threaded seven-deep loop nest (25-40x slower than torch,
TVM-NOTES.md). ``schedule_conv2d`` gives each fused conv function one of two register-tiled
direct convolutions, NCHW at the function boundary in both:

* out-channel vectorised (``_schedule_oc``; every conv with >= 16 out-channels and a reduction of
  >= 64 taps): the loop structure of TVM's old x86 ``conv2d_NCHWc`` schedule -- 16 out-channels
  per zmm, a 16-column register tile (16 accumulators: bench net 17% faster than 8 columns,
  same run), each input value broadcast from memory into one FMA;
* width vectorised (``_schedule_x``; first layers with 3 input channels): 16 columns per zmm,
  16 out-channels unrolled, each weight broadcast.

Measured on the bench net's convs at batch T*N = 64 (Sapphire Rapids, 2 cores, AVX-512, loaded
machine, same run): 128->128 torch/oneDNN 440 ms, width-vectorised 420 ms, out-channel
vectorised 333 ms (a pure NCHW16c kernel with pre-packed input: 317 ms). Vectorising needs the
reduction block intact, so ``vectorize`` comes before ``decompose_reduction`` (the other order
is the "ScheduleError" of TVM-NOTES.md (c)). The library must also keep LLVM's no-alias promise
for every kernel (``tvm_build._noalias``), or the accumulators are stored after every FMA.

A function that does not fit (other block names, a schedule primitive refusing) is left as it
was: slower, never wrong.
"""
from __future__ import annotations

import tvm
from tvm import s_tir

OPAQUE = 8
# below this reduction length (in-channels x kernel taps) the oc-vectorised tile's transposed
# write-back costs more than it saves: bench net conv 3->64 (27 taps) 2.7 ms width-vectorised
# vs 9.1 ms oc-vectorised; 64->128 (576 taps) the other way round
OC_MIN_REDUCTION = 64


def _divisor(n: int, widest: int) -> int:
    w = widest
    while w > 1 and n % w:
        w //= 2
    return w


def schedule_conv2d(func: tvm.tirx.PrimFunc, lanes: int = 16):
    """The scheduled function, or ``None`` if ``func`` is not a plain NCHW conv2d (+ epilogue).

    Out-channel-vectorised direct convolution (``_schedule_oc``) when the out-channels split into
    ``lanes``-wide vectors and the reduction is long enough to amortise the transposed write-back;
    otherwise (first layers: 3 input channels, few out-channels) the width-vectorised tile."""
    sch = s_tir.Schedule(func)
    try:
        conv = sch.get_sblock("conv2d_nchw")
    except Exception:  # no such block: not a conv function
        return None
    loops = sch.get_loops(conv)
    if len(loops) != 7:
        return None
    try:
        f_ext, rc_ext, ry_ext, rx_ext = (int(sch.get(loops[i]).extent) for i in (1, 4, 5, 6))
    except TypeError:  # a symbolic channel or kernel extent: leave it to the generic code
        return None
    if f_ext % lanes == 0 and rc_ext * ry_ext * rx_ext >= OC_MIN_REDUCTION:
        scheduled = _schedule_oc(func, lanes)
        if scheduled is not None:
            return scheduled
    return _schedule_x(func, lanes)


def _schedule_oc(func, lanes: int, reg_n: int = 16):
    """The NCHWc-style direct convolution of TVM's old x86 ``conv2d_NCHWc`` schedule (Liu et al.
    2019, "Optimizing CNN model inference on CPUs"), with NCHW kept at the function boundary:

        W' = W repacked to [F/16, C, KY, KX, 16] once per call (16 out-channels contiguous)
        for (n, f_outer, y) in parallel:
          for x_outer:
            acc[16 x][16 f] = 0                                   # 16 zmm registers
            for rc, ry, rx:
              for xi in unroll(16):                               # one broadcast FMA each:
                acc[xi][:] += in[n, rc, y+ry, x+xi+rx] * W'[f_outer, rc, ry, rx, :]
            out[n, f, y, x] = acc^T + bias                        # 256 scalar stores per tile

    Each step loads one weight vector and broadcasts 16 inputs from memory (``vfmadd231ps
    m32{1to16}``), so the loop is FMA-bound instead of load-bound. The accumulator tile must be
    laid out [x][f] (``transform_layout``) or the f vector is a strided gather."""
    sch = s_tir.Schedule(func)
    try:
        oc_steps(sch, lanes, reg_n)
        return sch.mod["main"]
    except Exception:  # noqa: BLE001 - a refusal means "try the other schedule"
        return None


def oc_steps(sch, lanes: int = 16, reg_n: int = 16) -> None:
    """The schedule primitives of ``_schedule_oc`` applied to ``sch`` (its trace is what a
    tuning database stores)."""
    conv = sch.get_sblock("conv2d_nchw")
    n, f, y, x, rc, ry, rx = sch.get_loops(conv)
    x_ext = int(sch.get(x).extent)
    wblock = sch.cache_read(conv, 1, "global")
    sch.transform_layout(wblock, ("write", 0), lambda a, b, c, d: (a // lanes, b, c, d, a % lanes))
    fo, fi = sch.split(f, [None, lanes])
    xo, xi = sch.split(x, [None, _divisor(x_ext, reg_n)])
    sch.reorder(n, fo, y, xo, rc, ry, rx, xi, fi)
    acc = sch.cache_write(conv, 0, "local")
    sch.transform_layout(conv, ("write", 0), lambda a, b, c, d: (a, c, d, b))
    sch.reverse_compute_at(acc, xo)
    for block in sch.get_consumers(acc):  # bias add, BN scale, ...: fold into the write-back
        sch.reverse_compute_inline(block)
    sch.parallel(sch.fuse(n, fo, y))
    sch.vectorize(fi)
    sch.unroll(xi)
    sch.decompose_reduction(conv, rc)
    _parallel_pad(sch, conv)


def _parallel_pad(sch, conv):
    for block in sch.get_producers(conv):  # the padded copy of the input
        if sch.get(block).name_hint.startswith("pad"):
            ploops = sch.get_loops(block)
            sch.parallel(sch.fuse(ploops[0], ploops[1]))


def _schedule_x(func, lanes: int):
    """The width-vectorised register tile (16 out-channels x 16 columns, weights broadcast)."""
    sch = s_tir.Schedule(func)
    try:
        conv = sch.get_sblock("conv2d_nchw")
        n, f, y, x, rc, ry, rx = sch.get_loops(conv)
        f_extent, x_extent = (int(sch.get(lp).extent) for lp in (f, x))
        fo, fi = sch.split(f, [None, _divisor(f_extent, 16)])
        xo, xi = sch.split(x, [None, _divisor(x_extent, lanes)])
        sch.reorder(n, fo, y, xo, rc, ry, rx, fi, xi)
        acc = sch.cache_write(conv, 0, "local")
        sch.reverse_compute_at(acc, xo)
        for block in sch.get_consumers(acc):  # bias add, BN scale, ...: fold into the write-back
            sch.reverse_compute_inline(block)
        sch.parallel(sch.fuse(n, fo, y))
        sch.vectorize(xi)
        sch.unroll(fi)
        sch.decompose_reduction(conv, rc)
        sch.vectorize(sch.get_loops(acc)[-1])
        _parallel_pad(sch, conv)
        return sch.mod["main"]
    except Exception:  # noqa: BLE001 - any refusal means "keep the unscheduled (correct) function"
        return None


@tvm.transform.module_pass(opt_level=0, name="snnc.ScheduleCPUConvs")
def schedule_cpu_convs(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Apply ``schedule_conv2d`` to every legalized, fused conv function of a Relax module and
    mark it opaque and scheduled so later fusion and dlight leave it alone."""
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc) or func.attrs is None or "tir.is_scheduled" in func.attrs:
            continue
        if "conv2d" not in gv.name_hint:
            continue
        new = schedule_conv2d(func)
        if new is not None:
            updates[gv] = new.with_attr("op_pattern", OPAQUE).with_attr("tir.is_scheduled", True)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def conv2d_kernel(conv, in_shape):
    """``(PrimFunc, has_bias)`` of one ``nn.Conv2d`` on inputs of ``in_shape``, scheduled as above,
    or ``None`` when the schedule does not apply (grouped / dilated convs keep torch). The
    function's arguments are ``(x, weight, [bias [1, C, 1, 1]], out)``."""
    from torch import fx, nn
    from tvm import relax
    from tvm.relax.frontend.torch import from_fx
    gm = fx.symbolic_trace(nn.Sequential(conv))
    mod = from_fx(gm, [(tuple(in_shape), "float32")])
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    funcs = [f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc) and "conv2d" in gv.name_hint]
    if len(funcs) != 1 or len(funcs[0].params) != (4 if conv.bias is not None else 3):
        return None
    scheduled = schedule_conv2d(funcs[0])
    return None if scheduled is None else (scheduled, conv.bias is not None)
