"""TIR kernels for the spiking ops: one fused scan over T per neuron layer, and the readout.

These builders know nothing about torch or the graph: they take sizes, a dtype and the neuron's
update rule as small Python functions on TIR expressions, so the float targets (``tvm:llvm``,
``tvm:cuda``) and the integer target (``tvm:int``: integer dtypes, shift leaks) share them.

The scan follows the three phases of ``snnc/ops/neurons.py`` (spikingjelly's order):

    H[t] = charge(V[t-1], X[t])     V[-1] = v_init
    S[t] = fire(H[t])               1[H >= v_th]  or  1[H > v_th]
    V[t] = reset(H[t], S[t])        H - v_th (subtract)  or  v_reset (zero) where S = 1, else H

Each kernel is ONE pass over the data with the T loop inside (Wu 2019's iterative update fused
over time): the flat neuron index is split into ``lanes``-wide chunks, chunks run in parallel
(CPU) or one neuron per GPU thread, and each chunk walks t = 0..T-1 while its data sits in L1 /
registers.

CPU kernel, and why it has no temporaries: in TVM 0.27 a let-bound scalar inside a
``T.vectorized`` loop gives wrong lanes (TVM-NOTES.md), and a ``local`` buffer per chunk becomes a
heap workspace allocation per chunk (measured 3x slower). So the chunk's membrane lives in its
own output row: ``S[t]`` first holds ``H[t]`` (the membrane before firing), the next step reads it
back to compute ``H[t+1]``, then ``S[t]`` is overwritten by the spike. The rows of one chunk are
64 bytes each and stay in L1, every statement is a plain vectorised buffer store. This needs the
spike dtype to hold membrane values (float spikes here; the integer target uses its membrane
dtype, e.g. int32, for spikes).

GPU kernel: one thread per neuron, the membrane in a register (a ``local`` buffer of one element,
which is a register in CUDA), spikes written once per step; no per-timestep launches.

Integer use (tested with int32: bit-exact against a torch loop)::

    rule = NeuronScan(charge=lambda v, x: v - (v >> 3) + x, v_th=64, reset="subtract")
    f = neuron_scan_kernel(T, None, "int32", rule, lanes=16)   # symbolic M, any batch
    readout_kernel(T, None, "int32")                            # floor(sum / T)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import tvm
from tvm.script import tirx as T

# (v, x) -> H : the charge phase as a function on TIR expressions
ChargeFn = Callable[[object, object], object]


@dataclasses.dataclass(frozen=True)
class NeuronScan:
    """The update rule of one neuron layer, as TIR expression builders.

    ``charge(v, x)`` builds H from V[t-1] and X[t]. ``v_th`` is a Python scalar (one threshold)
    or ``"buffer"``: the kernel then takes a threshold buffer of ``threshold_size`` values and
    reads it at ``(i // threshold_inner) % threshold_size`` for flat neuron index ``i`` (per
    channel: ``threshold_size = C``, ``threshold_inner = H*W``; any broadcast pattern: the whole
    sample, ``threshold_inner = 1``). ``v_init="buffer"`` (only with a threshold buffer): the
    start membrane is per neuron too, read from the same buffer after the thresholds, at
    ``threshold_size + (i // threshold_inner) % threshold_size`` (the buffer then holds
    ``2 * threshold_size`` values: one parameter, so every caller passes one buffer as before).
    """

    charge: ChargeFn
    v_th: float | int | str = 1.0
    compare: str = ">="            # ">=" (spikingjelly) or ">" (Wu 2019)
    reset: str = "subtract"        # "subtract" (Rueckauer 2017), "zero" (hard reset to v_reset) or
                                   # "subtract_after_leak" (snntorch: V = H, the next charge subtracts)
    v_reset: float | int = 0
    v_init: float | int | str = 0
    threshold_size: int = 1
    threshold_inner: int = 1
    max_spikes: int = 1            # > 1: burst spikes, clamp(floor(H / v_th), 0, max_spikes) per step
                                   # (snnc.ops.BurstIF; reset="subtract" only)


def pick_lanes(n: int, widest: int = 16) -> int:
    """The widest power-of-two vector width that divides ``n`` (so chunks never straddle)."""
    lanes = widest
    while lanes > 1 and n % lanes:
        lanes //= 2
    return lanes


def _rule(p: NeuronScan, dtype: str):
    """charge(v, x, i, th) / fire(h, i, th) / reset(h, i, th) as expression builders; ``th`` is
    the threshold buffer (or None for a scalar v_th) and ``i`` the flat neuron index."""
    one, zero = T.Cast(dtype, 1), T.Cast(dtype, 0)
    v_reset = T.Cast(dtype, p.v_reset)

    def threshold(i, th):
        if p.v_th == "buffer":
            return th[(i // p.threshold_inner) % p.threshold_size]
        return T.Cast(dtype, p.v_th)

    def init(i, th=None):
        if p.v_init == "buffer":   # channel-wise conversion's half-threshold start (one value per channel)
            return th[p.threshold_size + (i // p.threshold_inner) % p.threshold_size]
        return T.Cast(dtype, p.v_init)

    def fired(h, i, th):
        return h >= threshold(i, th) if p.compare == ">=" else h > threshold(i, th)

    def count(h, i, th):
        # BurstIF.fire: floor(H / v_th) (">=") or ceil(H / v_th) - 1 (">"), clamped to [0, max_spikes]
        r = h / threshold(i, th)
        k = T.floor(r) if p.compare == ">=" else T.ceil(r) - one
        return T.max(T.min(k, T.Cast(dtype, p.max_spikes)), zero)

    def fire(h, i, th=None):
        if p.max_spikes > 1:
            return count(h, i, th)
        return T.Select(fired(h, i, th), one, zero)

    def reset(h, i, th=None):
        if p.max_spikes > 1:   # the same rounded ops as Neuron.reset_membrane: H - v_th * S
            return h - threshold(i, th) * count(h, i, th)
        # s is 0 or 1, so H - v_th*S and H*(1-S) + v_reset*S are these selects, bit for bit
        if p.reset == "subtract":
            return T.Select(fired(h, i, th), h - threshold(i, th), h)
        if p.reset == "subtract_after_leak":
            return h
        return T.Select(fired(h, i, th), v_reset, h)

    def charge(v, x, i, th=None):
        # snntorch's order: H[t] = f(V[t-1], X[t]) - v_th * Θ(V[t-1] - v_th), the reset not decayed
        if p.reset == "subtract_after_leak":
            h = p.charge(v, x)
            return T.Select(fired(v, i, th), h - threshold(i, th), h)
        return p.charge(v, x)
    charge.init = init
    return charge, fire, reset


def neuron_scan_kernel(T_steps: int, M: int | None, dtype: str, p: NeuronScan, *,
                       device: str = "cpu", lanes: int | None = None):
    """PrimFunc ``(X[T, M], [VTH[threshold_size]], S[T, M])``: the fused scan of one neuron layer.

    The threshold buffer parameter exists only when ``p.v_th == "buffer"``. ``M`` is the number
    of neurons (N * sample size); ``M=None`` makes it symbolic so one build serves every batch
    size (then ``lanes`` must divide every M it will see: pass ``pick_lanes(sample_size)``).
    ``device`` is ``"cpu"`` (parallel + vectorised chunks) or ``"gpu"`` (one thread per neuron).
    """
    if p.compare not in (">=", ">") or p.reset not in ("subtract", "zero", "subtract_after_leak"):
        raise ValueError(f"neuron_scan_kernel: compare={p.compare!r} reset={p.reset!r} not supported")
    if p.max_spikes > 1 and p.reset != "subtract":
        raise ValueError(f"neuron_scan_kernel: max_spikes={p.max_spikes} needs reset='subtract'")
    if p.v_init == "buffer" and p.v_th != "buffer":
        raise ValueError("neuron_scan_kernel: v_init='buffer' needs v_th='buffer' (they share one buffer)")
    if device == "gpu":
        return _scan_gpu(T_steps, M, dtype, p)
    lanes = lanes or (pick_lanes(M) if M is not None else 1)
    if M is not None and M % lanes:
        raise ValueError(f"neuron_scan_kernel: lanes={lanes} does not divide M={M}")
    return (_scan_cpu_th if p.v_th == "buffer" else _scan_cpu)(T_steps, M, dtype, p, lanes)


def _scan_cpu(Tn, M_static, dtype, p, lanes):
    M = _size(M_static)
    init = T.Cast(dtype, p.v_init)
    charge, fire, reset = _rule(p, dtype)

    @T.prim_func(s_tir=True)
    def neuron_scan(x: T.handle, s: T.handle):
        T.func_attr({"tir.noalias": True})
        X = T.match_buffer(x, (Tn, M), dtype)
        S = T.match_buffer(s, (Tn, M), dtype)
        with T.sblock("root"):
            for io in T.parallel(M // lanes):
                for ii in T.vectorized(lanes):
                    S[0, io * lanes + ii] = charge(init, X[0, io * lanes + ii], io * lanes + ii)
                for t in T.unroll(1, Tn):
                    for ii in T.vectorized(lanes):
                        S[t, io * lanes + ii] = charge(reset(S[t - 1, io * lanes + ii], io * lanes + ii),
                                                       X[t, io * lanes + ii], io * lanes + ii)
                    for ii in T.vectorized(lanes):
                        S[t - 1, io * lanes + ii] = fire(S[t - 1, io * lanes + ii], io * lanes + ii)
                for ii in T.vectorized(lanes):
                    S[Tn - 1, io * lanes + ii] = fire(S[Tn - 1, io * lanes + ii], io * lanes + ii)
    return neuron_scan


def _scan_cpu_th(Tn, M_static, dtype, p, lanes):
    M = _size(M_static)
    charge, fire, reset = _rule(p, dtype)
    init = charge.init
    C = _buffer_size(p)

    @T.prim_func(s_tir=True)
    def neuron_scan(x: T.handle, th: T.handle, s: T.handle):
        T.func_attr({"tir.noalias": True})
        X = T.match_buffer(x, (Tn, M), dtype)
        VTH = T.match_buffer(th, (C,), dtype)
        S = T.match_buffer(s, (Tn, M), dtype)
        with T.sblock("root"):
            for io in T.parallel(M // lanes):
                for ii in T.vectorized(lanes):
                    S[0, io * lanes + ii] = charge(init(io * lanes + ii, VTH), X[0, io * lanes + ii],
                                                   io * lanes + ii, VTH)
                for t in T.unroll(1, Tn):
                    for ii in T.vectorized(lanes):
                        S[t, io * lanes + ii] = charge(reset(S[t - 1, io * lanes + ii], io * lanes + ii, VTH),
                                                       X[t, io * lanes + ii], io * lanes + ii, VTH)
                    for ii in T.vectorized(lanes):
                        S[t - 1, io * lanes + ii] = fire(S[t - 1, io * lanes + ii], io * lanes + ii, VTH)
                for ii in T.vectorized(lanes):
                    S[Tn - 1, io * lanes + ii] = fire(S[Tn - 1, io * lanes + ii], io * lanes + ii, VTH)
    return neuron_scan


def _scan_gpu(Tn, M_static, dtype, p, threads=256):
    """One thread per neuron; H and V in registers (``local`` scalars); S written once per step."""
    M = _size(M_static)
    init = T.Cast(dtype, p.v_init) if p.v_init != "buffer" else None
    charge, fire, reset = _rule(p, dtype)
    C = max(1, _buffer_size(p))
    with_th = p.v_th == "buffer"

    @T.prim_func(s_tir=True)
    def neuron_scan(x: T.handle, th: T.handle, s: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        X = T.match_buffer(x, (Tn, M), dtype)
        VTH = T.match_buffer(th, (C,), dtype)
        S = T.match_buffer(s, (Tn, M), dtype)
        with T.sblock("root"):
            for bx in T.thread_binding((M + threads - 1) // threads, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    with T.sblock("scan"):
                        T.reads(X[0:Tn, bx * threads + tx], VTH[0:C])
                        T.writes(S[0:Tn, bx * threads + tx])
                        V = T.alloc_buffer((1,), dtype, scope="local")
                        H = T.alloc_buffer((1,), dtype, scope="local")
                        if bx * threads + tx < M:
                            V[0] = charge.init(bx * threads + tx, VTH)
                            for t in T.serial(Tn):  # nvcc unrolls it; one launch for all T
                                H[0] = charge(V[0], X[t, bx * threads + tx], bx * threads + tx, VTH)
                                S[t, bx * threads + tx] = fire(H[0], bx * threads + tx, VTH)
                                V[0] = reset(H[0], bx * threads + tx, VTH)
    if with_th:
        return neuron_scan

    @T.prim_func(s_tir=True)
    def neuron_scan_scalar_th(x: T.handle, s: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        X = T.match_buffer(x, (Tn, M), dtype)
        S = T.match_buffer(s, (Tn, M), dtype)
        with T.sblock("root"):
            for bx in T.thread_binding((M + threads - 1) // threads, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    with T.sblock("scan"):
                        T.reads(X[0:Tn, bx * threads + tx])
                        T.writes(S[0:Tn, bx * threads + tx])
                        V = T.alloc_buffer((1,), dtype, scope="local")
                        H = T.alloc_buffer((1,), dtype, scope="local")
                        if bx * threads + tx < M:
                            V[0] = init
                            for t in T.serial(Tn):  # nvcc unrolls it; one launch for all T
                                H[0] = charge(V[0], X[t, bx * threads + tx], bx * threads + tx)
                                S[t, bx * threads + tx] = fire(H[0], bx * threads + tx)
                                V[0] = reset(H[0], bx * threads + tx)
    return neuron_scan_scalar_th


def _buffer_size(p: NeuronScan) -> int:
    """Values in the threshold buffer: the thresholds, then the start membranes if per neuron."""
    return p.threshold_size * (2 if p.v_init == "buffer" else 1)


def _size(M):
    """A static extent, or a symbolic one (bound by the buffer shapes) for any batch size."""
    return M if M is not None else tvm.tirx.Var("M", "int64")


def readout_kernel(T_steps: int, M: int | None, dtype: str, *, device: str = "cpu", lanes: int | None = None):
    """PrimFunc ``(X[T, M], Y[M])``: ``Y = (X[0] + X[1] + ... + X[T-1]) / T`` summed in time
    order, the rounding of ``Readout.forward`` (integer dtypes: floor division)."""
    def mean(X, i):
        acc = X[0, i]
        for t in range(1, T_steps):
            acc = acc + X[t, i]
        if dtype.startswith("float"):
            return acc / T.Cast(dtype, T_steps)
        return T.floordiv(acc, T.Cast(dtype, T_steps))

    if device == "gpu":
        threads = 256
        M_ = _size(M)

        @T.prim_func(s_tir=True)
        def readout(x: T.handle, y: T.handle):
            T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
            X = T.match_buffer(x, (T_steps, M_), dtype)
            Y = T.match_buffer(y, (M_,), dtype)
            with T.sblock("root"):
                for bx in T.thread_binding((M_ + threads - 1) // threads, thread="blockIdx.x"):
                    for tx in T.thread_binding(threads, thread="threadIdx.x"):
                        if bx * threads + tx < M_:
                            Y[bx * threads + tx] = mean(X, bx * threads + tx)
        return readout

    lanes = lanes or (pick_lanes(M) if M is not None else 1)
    M_ = _size(M)

    @T.prim_func(s_tir=True)
    def readout(x: T.handle, y: T.handle):
        T.func_attr({"tir.noalias": True})
        X = T.match_buffer(x, (T_steps, M_), dtype)
        Y = T.match_buffer(y, (M_,), dtype)
        with T.sblock("root"):
            for io in T.parallel(M_ // lanes):
                for ii in T.vectorized(lanes):
                    Y[io * lanes + ii] = mean(X, io * lanes + ii)
    return readout


def state_of(ST, j, K):
    """Neuron j's K state variables, read from a ``(K, ...)`` local state buffer."""
    return [ST[k, j] for k in range(K)]


def select_k(k, values):
    """The k-th of ``values`` (TIR expressions) for a loop variable k: one nested select, so a
    scan over any number of state variables needs no per-neuron code."""
    out = values[-1]
    for idx in range(len(values) - 2, -1, -1):
        out = T.Select(k == idx, values[idx], out)
    return out


def state_scan_kernel(T_steps: int, M: int | None, dtype: str, update, init, *,
                      device: str = "cpu", lanes: int | None = None):
    """PrimFunc ``(X[T, M], S[T, M])``: the fused scan of a neuron with several state variables.

    ``update(x, state) -> (spike, new_state)`` builds TIR expressions from ``x`` and the list of
    state values (the neuron's own update rule); ``init`` lists each state variable's initial
    value. Each chunk of neurons keeps its state in a local buffer and walks t = 0..T-1; the new
    state of variable k is one select over k, so any number of variables needs no new code. The
    loops inside a chunk are serial (no let-bound scalars in vectorised loops, TVM-NOTES.md)."""
    K = len(init)
    init = [T.Cast(dtype, v) for v in init]

    def spike(x, ST, j):
        return update(x, state_of(ST, j, K))[0]

    def new_state(x, ST, j, k):
        return select_k(k, update(x, state_of(ST, j, K))[1])

    def initial(k):
        return select_k(k, init)

    if device == "gpu":
        return _state_scan_gpu(T_steps, M, dtype, K, spike, new_state, initial)
    lanes = lanes or (pick_lanes(M) if M is not None else 1)
    if M is not None and M % lanes:
        raise ValueError(f"state_scan_kernel: lanes={lanes} does not divide M={M}")
    Mv = _size(M)

    @T.prim_func(s_tir=True)
    def state_scan(x: T.handle, s: T.handle):
        T.func_attr({"tir.noalias": True})
        X = T.match_buffer(x, (T_steps, Mv), dtype)
        S = T.match_buffer(s, (T_steps, Mv), dtype)
        with T.sblock("root"):
            for io in T.parallel(Mv // lanes):
                with T.sblock("chunk"):
                    T.reads(X[0:T_steps, io * lanes:io * lanes + lanes])
                    T.writes(S[0:T_steps, io * lanes:io * lanes + lanes])
                    ST = T.alloc_buffer((K, lanes), dtype, scope="local")
                    NEW = T.alloc_buffer((K, lanes), dtype, scope="local")
                    for k in T.serial(K):
                        for j in T.serial(lanes):
                            ST[k, j] = initial(k)
                    for t in T.serial(T_steps):
                        for j in T.serial(lanes):
                            S[t, io * lanes + j] = spike(X[t, io * lanes + j], ST, j)
                            for k in T.serial(K):
                                NEW[k, j] = new_state(X[t, io * lanes + j], ST, j, k)
                            for k in T.serial(K):
                                ST[k, j] = NEW[k, j]
    return state_scan


def _state_scan_gpu(Tn, M_static, dtype, K, spike, new_state, initial, threads=256):
    M = _size(M_static)

    @T.prim_func(s_tir=True)
    def state_scan(x: T.handle, s: T.handle):
        T.func_attr({"tir.noalias": True, "tir.is_scheduled": True})
        X = T.match_buffer(x, (Tn, M), dtype)
        S = T.match_buffer(s, (Tn, M), dtype)
        with T.sblock("root"):
            for bx in T.thread_binding((M + threads - 1) // threads, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    with T.sblock("scan"):
                        T.reads(X[0:Tn, bx * threads + tx])
                        T.writes(S[0:Tn, bx * threads + tx])
                        ST = T.alloc_buffer((K, 1), dtype, scope="local")
                        NEW = T.alloc_buffer((K, 1), dtype, scope="local")
                        if bx * threads + tx < M:
                            for k in T.serial(K):
                                ST[k, 0] = initial(k)
                            for t in T.serial(Tn):
                                S[t, bx * threads + tx] = spike(X[t, bx * threads + tx], ST, 0)
                                for k in T.serial(K):
                                    NEW[k, 0] = new_state(X[t, bx * threads + tx], ST, 0, k)
                                for k in T.serial(K):
                                    ST[k, 0] = NEW[k, 0]
    return state_scan

