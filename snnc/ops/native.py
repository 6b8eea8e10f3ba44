"""The native fused neuron scan (``kernels/neuron_scan.c``) and the event-driven weight gradient
of convs fed by spikes (``kernels/spike_weight_grad.c``): one library, built on first use, loaded
by ctypes.

Why C and not torch ops: on CPU a neuron layer's training step is memory-bound; the torch form
makes ~6 passes over the membrane per step forward and ~10 over the sequence backward, the C
loop one pass each way (read X, write S and z; read z and dL/dS, write dL/dX). Plain C with no
torch headers compiles in about a second; ``-ffp-contract=off`` keeps every multiply and add
separately rounded, so the forward is bit-identical to the torch reference.

The shared library is cached under ``$SNNC_CACHE_DIR`` (default ``~/.cache/snnc``; a folder others can write is not used) by a hash of the
source and flags. No C compiler, a failed build, or ``SNNC_NATIVE=0``: ``load()`` returns None
and ``snnc.ops.neuron_scan`` uses its torch implementation (same results).
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from snnc.fileio import _private_enough, private_dir

SOURCE = Path(__file__).parent / "kernels" / "neuron_scan.c"
SOURCES = (SOURCE, SOURCE.with_name("spike_weight_grad.c"))   # one shared library
FLAG_SETS = (["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared"],
             ["-O3", "-ffp-contract=off", "-fPIC", "-shared"])
SURROGATE_IDS = {"rectangular": 0, "sigmoid": 1, "atan": 2, "triangle": 3}
_lock = threading.Lock()
_state = {"lib": None, "tried": False, "pool": None, "error": None}

_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_FORWARD_ARGS = [_ptr] * 5 + [_i64] * 4 + [_f32, _f32, _int, _f32, _f32, _int, _f32, _f32, _int]
_BACKWARD_ARGS = [_ptr] * 4 + [_int, _ptr] + [_i64] * 4 + [_f32, _f32, _f32, _int, _f32, _int, _f32]


def _cache_dir() -> Path:
    """The folder the library is cached in: the TVM cache's root (``$SNNC_CACHE_DIR``; the older
    ``$SNNC_CACHE`` still works), or a fresh private folder when that one is not ours alone: a
    shared library found there is loaded (runs code), so nobody else may be able to put one there."""
    root = Path(os.environ.get("SNNC_CACHE_DIR") or os.environ.get("SNNC_CACHE") or Path.home() / ".cache" / "snnc")
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError:
        pass
    if _private_enough(root):
        return root
    folder = private_dir("snnc-native-")
    atexit.register(shutil.rmtree, folder, True)   # the loaded library stays mapped
    return Path(folder)


def _build(flags, sources=SOURCES, stem="neuron_scan") -> Path:
    """The shared library of ``sources`` built with ``flags`` (cached by their hash), e.g. also
    ``targets/tvm_parallel.py``'s OpenMP hook."""
    source = b"".join(src.read_bytes() for src in sources)
    digest = hashlib.sha1(source + " ".join(flags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"{stem}-{digest}.so"
    if target.exists() and _private_enough(target):   # ours and not writable by others
        return target
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise OSError("no C compiler (cc/gcc) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, *map(str, sources), "-o", tmp, "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.replace(tmp, target)   # atomic: concurrent builders never see a half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def load():
    """The ctypes library, or None when native kernels are unavailable or disabled."""
    if os.environ.get("SNNC_NATIVE", "1") == "0":
        return None
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            for flags in FLAG_SETS:
                try:
                    lib = ctypes.CDLL(str(_build(flags)))
                    lib.snnc_scan_forward.argtypes = _FORWARD_ARGS
                    lib.snnc_scan_backward.argtypes = _BACKWARD_ARGS
                    lib.snnc_spike_weight_grad.argtypes = [_ptr] * 3 + [_i64] * 17
                    _state["lib"] = lib
                    break
                except (OSError, subprocess.SubprocessError) as e:
                    _state["error"] = f"{type(e).__name__}: {e}"
        return _state["lib"]


def _ranges(M, parts):
    step = -(-M // parts)
    step = -(-step // 512) * 512    # whole blocks per thread
    return [(lo, min(M, lo + step)) for lo in range(0, M, step)]


def _parallel(fn, M, T=1):
    # a thread per >= 1M elements of work (T steps x M neurons), in whole 512-neuron blocks: the
    # Open Neuromorphic layer (M = 16k neurons, T = 500) is 8M elements and splits in two
    threads = max(1, min(torch.get_num_threads(), M // 512, (T * M) >> 20))
    if threads == 1:
        fn(0, M)
        return
    if _state["pool"] is None or _state["pool"]._max_workers < threads:
        _state["pool"] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="snnc-scan")
    for f in [_state["pool"].submit(fn, lo, hi) for lo, hi in _ranges(M, threads)]:
        f.result()


def _ptr_or_null(t):
    return None if t is None else t.data_ptr()


def _dense(x) -> bool:
    # every element once, no gaps: the strides of the non-trivial dims, sorted, are the running
    # products of their sizes (any order of dims in memory)
    expected = 1
    for st, n in sorted((x.stride(d), x.size(d)) for d in range(x.dim()) if x.size(d) > 1):
        if st != expected:
            return False
        expected *= n
    return True


def time_major(x) -> bool:
    """Whether ``x [T, ...]`` is one dense block per step, steps in order (``[T, M]`` in memory):
    row-major, or each step channels_last (what the training convs produce). The kernels are
    elementwise within a step, so any such layout works if all their tensors share it."""
    return x.dim() > 0 and (x.is_contiguous() or (
        (x.shape[0] == 1 or x.stride(0) == x[0].numel()) and _dense(x)))


def feature_major(x) -> bool:
    """Whether ``x [T, ..., F]`` lies in memory as ``[F, T, ...]``: what a Linear computing
    ``y^T = W x^T`` returns (``snnc.ops.gemm``, feature-major layout). Each feature's T steps
    are then one contiguous run, which the kernels walk as one row."""
    return x.dim() >= 2 and x.shape[0] > 1 and x.shape[-1] > 1 and x.movedim(-1, 0).is_contiguous()


def _lanes(x):
    """``(x, L)``: the kernels' ``[R, T, L]`` view of ``x [T, ...]`` (see neuron_scan.c): the
    time-major layout is R = 1, L = M; the feature-major one R = F, L = M / F; any other layout
    is copied to time-major first."""
    if time_major(x):
        return x, x[0].numel()
    if feature_major(x):
        return x, x[0].numel() // x.shape[-1]
    x = x.contiguous()
    return x, x[0].numel()


def scan_forward(lib, x, p, half_state=False, overwrite_input=False, keep_state=True):
    """``x [T, ...]`` float32 -> ``(spikes, spikes_u8, z)``; ``z`` float16 when ``half_state``,
    None without ``keep_state`` (backward will recompute it: ``scan_state_in_place``);
    ``p``: the neuron constants (see neuron_scan). ``overwrite_input``: the spikes are written over
    ``x`` (each element is read before it is written) and returned as a new tensor on its memory.
    The outputs keep ``x``'s memory layout when it is ``time_major`` (no copy of a channels_last x)
    or ``feature_major``."""
    x, L = _lanes(x)
    if overwrite_input:   # a fresh tensor object on x's memory: autograd sees a new output
        s = torch.empty(0, dtype=x.dtype).set_(x.untyped_storage(), x.storage_offset(), x.size(), x.stride())
    else:
        s = torch.empty_like(x)
    s8 = torch.empty_like(x, dtype=torch.uint8)
    z = torch.empty_like(x, dtype=torch.float16 if half_state else torch.float32) if keep_state else None
    zf, zh = (None, z) if half_state else (z, None)
    _run_forward(lib, x, s, s8, zf, zh, p, L)
    return s, s8, z


def scan_state_in_place(lib, x, p):
    """The float32 ``z`` of the forward scan written over ``x`` (float32, ``time_major``, the
    caller's own: each element is read before z overwrites it), no spikes written; returns ``x``.
    Bit-identical to ``scan_forward``'s z: the same loop."""
    if x.dtype != torch.float32 or not time_major(x):
        raise ValueError(f"scan_state_in_place: x must be float32 and time-major, got {x.dtype} strides {x.stride()}")
    _run_forward(lib, x, None, None, x, None, p, x[0].numel())
    return x


def _run_forward(lib, x, s, s8, zf, zh, p, L):
    """The forward kernel over ``x`` in its ``[R, T, L]`` layout (``_lanes``); NULL outputs unwritten."""
    T, M = x.shape[0], x[0].numel()
    args = (p["decay"], p["gain"], int(p["decay_input"]), p["v_leak"], p["v_th"], int(p["zero_reset"]),
            p["v_reset"], p["v_init"], int(p["strict"]))
    _parallel(lambda lo, hi: lib.snnc_scan_forward(x.data_ptr(), _ptr_or_null(s), _ptr_or_null(s8), _ptr_or_null(zf),
                                                   _ptr_or_null(zh), T, L, lo, hi, *args), M, T)


def scan_backward(lib, z, s8, grad_s, p, kind, param, in_place=False):
    """dL/dX from the saved ``z`` (float32 or float16) and uint8 spikes; ``grad_s`` may be a
    broadcast scalar (all strides 0, as ``out.sum().backward()`` gives): it is read once.
    ``in_place``: dL/dX is written over a float32 ``z`` (each z is read before its dL/dX is
    written; the kernel's pointers are not ``restrict``): no second [T, ...] buffer."""
    scalar = all(st == 0 for st in grad_s.stride())
    # the one value of a broadcast grad_s, without materialising it (reshape(-1) would copy)
    if scalar:
        grad_s = grad_s[(0,) * grad_s.dim()].reshape(1).contiguous()
    elif grad_s.stride() != z.stride():   # dL/dS in the layout of the saved z (see time_major)
        grad_s = torch.empty_like(z, dtype=torch.float32).copy_(grad_s)
    T, M, L = z.shape[0], z[0].numel(), _lanes(z)[1]   # z is never copied: it is in a kernel layout
    gx = z if in_place and z.dtype == torch.float32 else torch.empty_like(z, dtype=torch.float32)
    zf, zh = (z, None) if z.dtype == torch.float32 else (None, z)
    args = (p["decay"], p["gain"], p["v_th"], int(p["zero_reset"]), p["v_reset"], SURROGATE_IDS[kind], param)
    _parallel(lambda lo, hi: lib.snnc_scan_backward(_ptr_or_null(zf), _ptr_or_null(zh), s8.data_ptr(), grad_s.data_ptr(),
                                                    int(scalar), gx.data_ptr(), T, L, lo, hi, *args), M, T)
    return gx


def spike_weight_grad(lib, s8, grad_out, weight_shape, geometry):
    """dL/dW ``[O, C, KH, KW]`` of an ungrouped conv from its 0/1 input ``s8`` (uint8
    ``[N, C, H, W]``) and ``grad_out`` ``[N, O, OH, OW]``, both channels_last in memory, by adding one
    ``grad_out`` row per (spike, kernel tap) (``kernels/spike_weight_grad.c``). Threads split the
    input channels. The result is a view in ``[C, KH, KW, O]`` memory."""
    (stride, padding, dilation, _), (O, C, KH, KW) = geometry, weight_shape
    N, _, H, W = s8.shape
    OH, OW = grad_out.shape[2:]
    acc = torch.zeros(C, KH, KW, O, dtype=torch.float32)
    args = (N, H, W, C, OH, OW, O, KH, KW, *stride, *padding, *dilation)
    parts = max(1, min(torch.get_num_threads(), C))
    bounds = [C * i // parts for i in range(parts + 1)]

    def run(i):
        lib.snnc_spike_weight_grad(s8.data_ptr(), grad_out.data_ptr(), acc[bounds[i]:].data_ptr(), *args,
                                   bounds[i], bounds[i + 1])
    if parts == 1:
        run(0)
    else:
        if _state["pool"] is None or _state["pool"]._max_workers < parts:
            _state["pool"] = ThreadPoolExecutor(max_workers=parts, thread_name_prefix="snnc-scan")
        for f in [_state["pool"].submit(run, i) for i in range(parts)]:
            f.result()
    return acc.permute(3, 0, 1, 2)
