"""Compile time: ResNet-19 (T=4) trace + passes + ``tvm:llvm`` compile, cold and cached, with a
per-stage breakdown; ``tvm:int`` compile of the converted digits CNN; ONNX export time against T.

    .venv/bin/python bench/compile_time.py [--quick]

One JSON line per result. Stages are timed with ``time.perf_counter``; inside a stage the
breakdown (how often the model ran for metadata, the verifier, the kernel build, the conv race,
the cache write) comes from a ``cProfile`` run of the same cold compile, so the numbers of one
line add up within the profiler's overhead. "cold" uses an empty cache folder; "cached_disk"
clears the in-process cache first (a new process with the disk cache), "cached_memory" does not.
ONNX: a LIF layer graph exported with ``loop="auto"`` at T = 4, 16, 64, 256 (Scan form from
T = 16): the export time should not grow with T.
"""
from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

# bench/tvm.py would shadow the tvm package for scripts run from this folder
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import snnc  # noqa: E402
from snnc.ops import LIF  # noqa: E402
from snnc.passes import fold_tdbn, unroll_timesteps  # noqa: E402
from snnc.zoo import resnet19  # noqa: E402

# (label, module file, function): cumulative seconds inside these, from the profile of a cold run
_INSIDE = [("metadata_runs", "snnc/ir.py", "annotate"), ("verify", "snnc/verifier.py", "verify"),
           ("hybrid_graph", "tvm_hybrid.py", "hybrid_graph"), ("tvm_build", "tvm_build.py", "build_kernels"),
           ("conv_race", "tvm_hybrid.py", "race_convs"), ("cache_write", "fileio.py", "write_cache_entry")]


def emit(**row):
    print(json.dumps(row), flush=True)


def _inside(profile) -> dict:
    stats = pstats.Stats(profile).stats
    out = {}
    for label, path, func in _INSIDE:
        hits = [(v[0], v[3]) for (f, _, name), v in stats.items() if f.endswith(path) and name == func]
        if hits:
            out[label + "_s"] = round(sum(t for _, t in hits), 3)
            out[label + "_calls"] = sum(n for n, _ in hits)
    return out


def resnet19_compile(width: float):
    torch.manual_seed(0)
    net, x = resnet19(width=width).eval(), torch.rand(1, 3, 32, 32)
    from snnc.targets import tvm_build
    stages = {}
    prof = cProfile.Profile()
    prof.enable()
    t0 = time.perf_counter()
    g = snnc.trace(net, x)
    stages["trace_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    g = unroll_timesteps(g, T=4)
    stages["unroll_timesteps_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    g = fold_tdbn(g)
    stages["fold_tdbn_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    m = snnc.compile(g, target="tvm:llvm")
    stages["tvm_llvm_compile_s"] = time.perf_counter() - t1
    prof.disable()
    total = time.perf_counter() - t0
    emit(bench="compile_time", graph=f"resnet19 width={width} T=4 N=1", cache="cold", total_s=round(total, 2),
         **{k: round(v, 2) for k, v in stages.items()}, inside=_inside(prof), convs=m.meta.get("hybrid_convs"))
    tvm_build._MEMORY_CACHE.clear()
    t1 = time.perf_counter()
    snnc.compile(g, target="tvm:llvm")
    disk = time.perf_counter() - t1
    t1 = time.perf_counter()
    snnc.compile(g, target="tvm:llvm")
    mem = time.perf_counter() - t1
    emit(bench="compile_time", graph=f"resnet19 width={width} T=4 N=1", cache="warm",
         tvm_llvm_compile_cached_disk_s=round(disk, 3), tvm_llvm_compile_cached_memory_s=round(mem, 3),
         trace_and_passes_s=round(stages["trace_s"] + stages["unroll_timesteps_s"] + stages["fold_tdbn_s"], 2))


def tvm_int_compile(quick: bool):
    from snnc.data import digits
    from snnc.demo import train_ann
    from snnc.passes import fold_bn, quantize_integer, threshold_balance
    from snnc.zoo import digits_cnn
    data = digits()
    torch.manual_seed(0)
    ann = train_ann(digits_cnn(16), data, epochs=1)
    g = unroll_timesteps(threshold_balance(fold_bn(snnc.trace(ann, data.x_test[:1])), data.x_train[:256]), 16)
    t0 = time.perf_counter()
    q = quantize_integer(g)
    tq = time.perf_counter() - t0
    for isa in ("auto", "portable"):
        t0 = time.perf_counter()
        m = snnc.compile(q, target="tvm:int", isa=isa)
        emit(bench="compile_time", graph="converted digits_cnn T=16", stage="tvm:int", isa=m.meta["int8_isa"],
             quantize_integer_s=round(tq, 2), compile_s=round(time.perf_counter() - t0, 2))


def _lif_graph(T):
    return unroll_timesteps(snnc.trace(nn.Sequential(nn.Linear(64, 64), LIF(tau=2.0)), torch.zeros(1, 64)), T=T)


def onnx_export_vs_T(quick: bool):
    for loop in ("unroll", "scan"):  # untimed: the first export of each form pays torch.onnx's warm-up
        snnc.compile(_lif_graph(2), target="onnx", loop=loop)
    for T in (4, 16, 64) if quick else (4, 16, 64, 256):
        g = _lif_graph(T)
        t0 = time.perf_counter()
        m = snnc.compile(g, target="onnx", loop="auto")
        emit(bench="compile_time", graph="linear+LIF 64", stage="onnx export", T=T, loop=m.meta.get("loop"),
             export_s=round(time.perf_counter() - t0, 3))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="ResNet-19 at width 1/4, T up to 64")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        os.environ["SNNC_CACHE_DIR"] = d       # cold: nothing built before, nothing left behind
        resnet19_compile(0.25 if args.quick else 1.0)
        tvm_int_compile(args.quick)
    onnx_export_vs_T(args.quick)


if __name__ == "__main__":
    main()
