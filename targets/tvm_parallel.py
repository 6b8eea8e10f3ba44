"""The hybrid ``tvm:llvm`` kernels on torch's OpenMP threads: the parallel loops of the kernel
library run on the OpenMP team torch itself uses, not on TVM's own thread pool.

Why (measured on the 2-core Zen 5 host): after every parallel torch op, torch's OpenMP workers
keep spinning for several ms (4-8 ms of CPU per op, libgomp's default spin before sleeping), and
TVM's pool spins likewise after each of its kernels. With two pools on two cores each hand-off
(a torch op, then a TVM kernel, or the reverse) runs the next kernel's first milliseconds at half
speed on the core the other pool's spinner holds: a torch copy of the first layer's input cost
more than the conv kernel after it (``spike_fused``), and the caller's own torch ops before a
module call hit its first kernel the same way. One pool has no hand-off: the threads that just
finished a torch op (still spinning, so awake) take the TVM kernel's tasks.

How: a library TVM builds calls its parallel launch through a function pointer it exports,
``__TVMBackendParallelLaunch``, which TVM's loader points at its pool. Here it is pointed at an
OpenMP launcher (``snnc/ops/kernels/tvm_parallel.c``,
built and cached like the native kernels), linked against ``libgomp.so.1``: the dynamic linker
resolves that to the libgomp torch has already loaded, so the team is torch's.

Assumes: torch's parallel backend is OpenMP and the library is a loaded ``.so`` (a library just
built in memory is loaded from its cache file, or from a private temporary copy). Guarantees: the
same kernels and TVM's own loop split (``num_task`` chunks; here 4 per thread, taken dynamically,
so a thread the OS deschedules on a loaded machine does not hold the others spinning), so results
are bit-identical to TVM's pool (chunks are independent; a library whose loops synchronise
threads, ``__TVMBackendParallelBarrier``, is not hooked). Where anything is missing (no C
compiler, another torch backend, ``SNNC_TVM_THREADS=tvm`` for comparisons), TVM's pool stays,
with the same results. The hooks
belong to a loaded library, so a library already hooked in this process stays hooked
(``meta["kernel_threads"]`` says so; ``cache=False`` builds a fresh one).
"""
from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch
import tvm

from snnc.fileio import private_dir
from snnc.ops import native

SOURCE = Path(native.__file__).parent / "kernels" / "tvm_parallel.c"
FLAGS = ["-O2", "-fopenmp", "-fPIC", "-shared"]
LAUNCH, BARRIER = "__TVMBackendParallelLaunch", "__TVMBackendParallelBarrier"
_lock = threading.Lock()
_state = {"lib": None, "tried": False, "error": None}
_loaded = {}  # library path -> the module loaded from it, its hooks pointing at OpenMP


def unavailable_reason() -> str | None:
    """Why TVM's own pool runs the kernels here, or None when torch's OpenMP team can."""
    if os.environ.get("SNNC_TVM_THREADS", "torch") == "tvm":
        return "SNNC_TVM_THREADS=tvm"
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return "torch's parallel backend is not OpenMP"
    with _lock:
        if not _state["tried"]:
            _state["tried"] = True
            try:
                lib = ctypes.CDLL(str(native._build(FLAGS, (SOURCE,), "tvm_parallel")))
                lib.snnc_tvm_set_threads.argtypes = [ctypes.c_int]
                _state["lib"] = lib
            except (OSError, subprocess.SubprocessError) as e:
                _state["error"] = f"the OpenMP launcher did not build: {type(e).__name__}: {e}"
    return _state["error"]


def on_torch_threads(built):
    """``(built', how)``: ``built`` (a ``tvm_build.Built`` kernel library) with its parallel loops
    on torch's OpenMP team, ``how`` = ``"torch-openmp"``; or ``built`` unchanged and
    ``"tvm-pool: <why>"``. The team size is torch's thread count now (as TVM's pool follows it)."""
    from .tvm_build import Built
    why = unavailable_reason()
    if why is not None:
        if built.path is not None and str(built.path) in _loaded:  # hooks are per loaded library
            return Built(_loaded[str(built.path)], built.path), "torch-openmp: hooked earlier in this process"
        return built, f"tvm-pool: {why}"
    lib = _state["lib"]
    lib.snnc_tvm_set_threads(torch.get_num_threads())
    with _lock:
        path = str(built.path) if built.path is not None else None
        if path is not None and path in _loaded:
            return Built(_loaded[path], built.path), "torch-openmp"
        if path is None or getattr(built.module, "kind", None) != "library":
            if path is None:  # not cached: a private copy to load from (the loader needs a file)
                folder = private_dir()
                atexit.register(shutil.rmtree, folder, True)  # the loaded library stays mapped
                path = os.path.join(folder, "lib.so")
                built.write(path)
            module = tvm.runtime.load_module(path)
        else:
            module = built.module
        handle = ctypes.CDLL(path)  # the object TVM loaded (dlopen of a loaded path returns it)
        try:
            ctypes.c_void_p.in_dll(handle, BARRIER)
            return built, "tvm-pool: the library synchronises threads inside a loop"
        except ValueError:  # no barrier: chunks may run on any thread (tvm_parallel.c)
            pass
        try:
            slot = ctypes.c_void_p.in_dll(handle, LAUNCH)
        except ValueError:  # no parallel loop at all
            return built, "tvm-pool: the library has no parallel loop"
        if not slot.value:  # not the copy TVM's loader initialised: leave it alone
            return built, "tvm-pool: the library's hooks were not where TVM set them"
        slot.value = ctypes.cast(lib.snnc_tvm_parallel_launch, ctypes.c_void_p).value
        _loaded[path] = module
    return Built(module, Path(path)), "torch-openmp"
