"""Benchmark of the deployable TVM library: one JSON line per result, ratios to torch.compile and
torch eager measured in the same run (interleaved rounds, medians).

    .venv/bin/python -P bench/tvm.py [--quick] [--tune] [--no-resnet]

* bench net (3x3 conv + LIF, 3->64->128->128, 32x32, T=4) at N = 1, 16, 64 (--quick: 1, 4):
  torch eager (snnc ``torch`` target), torch.compile of a plain multi-step loop (same weights,
  same LIF arithmetic), snnc ``onnx`` (onnxruntime), spikingjelly 2.0 multi-step
  (``LIFNode(step_mode="m")``, shared weights), snnc ``tvm:llvm`` in process (hybrid: torch
  convs + TVM neuron kernels) and the exported library (``export`` -> ``snnc.load``: the Relax VM,
  TVM's own convs, no torch inside; one library, symbolic batch, serves every N) in three builds,
  to show what each step buys: ``spike_convs="auto"`` (the shipped default: convs on spikes in
  int8 on AMX tiles / VNNI, whichever the host has), ``"vnni"`` and ``"fp32"`` (the fp32
  direct-conv schedule), and ``"auto"`` with ``spike_digits="auto"`` (one int8 weight digit where
  the spikes on a separate calibration draw keep >= 99.9% agreement: ``_digits_auto``). Checks: each library's max difference / spike agreement against eager,
  and per-layer firing rates (weights scaled so every layer fires);
* where each library's time goes (one instrumented VM call: per-kernel ms), and at N=1 the
  per-call overhead: the snnc module call vs a bare VM call on pre-made TVM tensors vs the sum of
  the kernels;
* ResNet-19 (T=4, direct input, 32x32, tdBN folded) at N = 1 and 16 (--quick: width 1/4, N=1);
* compile time of the library (cold, cached) and, with ``--tune``, MetaSchedule tuning of the
  bench net's convs (wall budget ``--tune-minutes``) and the tuned library's time.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# this file is named tvm.py: drop its folder from the path so `import tvm` finds TVM, not us
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import snnc  # noqa: E402
from snnc.errors import SnncError  # noqa: E402
from snnc.ops import LIF  # noqa: E402
from snnc.passes import fold_tdbn, unroll_timesteps  # noqa: E402
from snnc.report import interleaved_seconds  # noqa: E402
from snnc.zoo import bench_net, resnet19  # noqa: E402


# untimed seconds after each call: torch's OpenMP threads spin 4-8 ms after a parallel op and TVM's
# pool likewise; at N=1 (calls of ~8 ms) the row after the in-process module measured 2.5x slow
SPIN_PAUSE_S = 0.02


def emit(**kw):
    print(json.dumps(kw), flush=True)


def scaled_bench_net(seed=0):
    """bench_net with conv weights scaled so that every LIF layer fires (rates reported)."""
    torch.manual_seed(seed)
    net = bench_net().eval()
    with torch.no_grad():
        for m in net:
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(3.0)
    return net


def plain_loop(net, T):
    """The bench net as a user writes it without any SNN library: conv on the T*N batch, then a
    python loop over T with the LIF arithmetic of snnc's LIF (charge, fire, reset)."""
    layers = list(net)

    def run(x):
        h = x
        for conv, lif in zip(layers[0::2], layers[1::2]):
            y = conv(h.flatten(0, 1)).unflatten(0, (T, h.shape[1]))
            v, out = torch.zeros_like(y[0]), []
            for t in range(T):
                v = v * lif.decay + (y[t] * lif.gain if lif.decay_input else y[t])
                s = (v >= lif.v_th).to(v.dtype)
                v = v - s * lif.v_th if lif.reset_mode == "subtract" else v * (1 - s) + s * lif.v_reset
                out.append(s)
            h = torch.stack(out)
        return h
    return run


def spikingjelly_net(net):
    try:
        from spikingjelly.activation_based import functional, layer, neuron
    except ImportError:
        return None
    layers = []
    for m in net:
        if isinstance(m, LIF):
            layers.append(neuron.LIFNode(tau=1.0 / (1.0 - m.decay), decay_input=m.decay_input, v_threshold=float(m.v_th),
                                         v_reset=None if m.reset_mode == "subtract" else float(m.v_reset),
                                         step_mode="m"))
        else:
            layers.append(layer.SeqToANNContainer(m))
    sj = nn.Sequential(*layers).eval()

    def run(x):
        functional.reset_net(sj)
        return sj(x)
    return run


def firing_rates(net, x):
    rates, h = [], x
    for m in net:
        if isinstance(m, LIF):
            h = m.multi_step(h) if hasattr(m, "multi_step") else m(h)
            rates.append(round(float(h.mean()), 4))
        else:
            h = m(h.flatten(0, 1)).unflatten(0, h.shape[:2])
    return rates


def exported(m, d, name):
    return snnc.load(m.export(Path(d) / f"{name}.so"))


def bench_net_at(n, rounds, d, libraries, check_firing=True):
    net = scaled_bench_net()
    x = torch.rand(4, n, 3, 32, 32) * 2
    g = unroll_timesteps(snnc.trace(net, x[0]), T=4)
    eager = snnc.compile(g, target="torch")
    ref = eager(x)
    fns = {"torch_eager": lambda: eager(x)}
    loop = plain_loop(net, 4)
    try:
        tc = torch.compile(loop)
        tc(x)
        fns["torch_compile"] = lambda: tc(x)
        emit(bench="bench_net", N=n, check="torch_compile_vs_eager_spike_agreement",
             value=float((tc(x) == ref).float().mean()))
    except Exception as e:  # no C++ compiler for inductor, etc.
        emit(bench="bench_net", N=n, impl="torch_compile", skipped=type(e).__name__)
    try:
        onnx = snnc.compile(g, target="onnx")
        fns["snnc_onnx"] = lambda: onnx(x)
    except Exception as e:  # noqa: BLE001 - onnxruntime missing
        emit(bench="bench_net", N=n, impl="snnc_onnx", skipped=type(e).__name__)
    sj = spikingjelly_net(net)
    if sj is not None:
        fns["spikingjelly_m"] = lambda: sj(x)
        emit(bench="bench_net", N=n, check="spikingjelly_vs_eager_spike_agreement", value=float((sj(x) == ref).float().mean()))
    hybrid = snnc.compile(g, target="tvm:llvm")
    fns["snnc_tvm_llvm_in_process"] = lambda: hybrid(x)
    for name, library in libraries.items():
        fns[name] = lambda library=library: library(x)
        out = library(x)
        emit(bench="bench_net", N=n, check="library_vs_eager", impl=name, spike_convs=library.meta.get("spike_convs"),
             max_abs_diff=float((out - ref).abs().max()), spike_agreement=float((out == ref).float().mean()))
    if check_firing:
        with torch.no_grad():
            emit(bench="bench_net", N=n, check="firing_rates_per_layer", rates=firing_rates(net, x))
    with torch.no_grad():
        t = interleaved_seconds(fns, rounds, pause=SPIN_PAUSE_S)
    base = t.get("torch_compile", t["torch_eager"])
    for k, v in t.items():
        emit(bench="bench_net", N=n, T=4, impl=k, ms=round(v * 1e3, 2), ratio_to_torch_compile=round(v / base, 3),
             ratio_to_torch_eager=round(v / t["torch_eager"], 3))
    return g, x


def library_profile(library, x, name, calls=5):
    """Per-kernel time of instrumented VM calls (median over ``calls``), to see where the
    library's time goes; returns the median total. The instrument callback itself costs a few
    microseconds per kernel."""
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(library.relax_lib.module, tvm.cpu(0))
    spent, start = collections.defaultdict(float), {}

    def instrument(func, fname, before_run, ret_value, *args):
        if before_run:
            start[fname] = time.perf_counter()
        else:
            spent[fname] += time.perf_counter() - start[fname]
        return 0
    arg = tvm.runtime.tensor(x.numpy())
    vm["main"](arg)
    vm.set_instrument(instrument)
    per_call = collections.defaultdict(list)
    for _ in range(calls):
        spent.clear()
        vm["main"](arg)
        for k, v in spent.items():
            per_call[k].append(v)
    med = {k: statistics.median(v) for k, v in per_call.items()}
    total = sum(med.values())
    for k, v in sorted(med.items(), key=lambda kv: -kv[1]):
        if v * 1e3 >= 0.05:
            emit(bench="library_profile", net=name, N=x.shape[1], kernel=k, ms=round(v * 1e3, 2),
                 share=round(v / total, 3))
    return total


def library_overhead(library, x, rounds):
    """Per-call cost at small N: the snnc module call (torch -> DLPack -> VM -> torch), one bare
    VM call on a pre-made TVM tensor, and the sum of the kernels it runs (instrumented)."""
    import tvm
    from tvm import relax
    vm = relax.VirtualMachine(library.relax_lib.module, tvm.cpu(0))
    arg = tvm.runtime.tensor(x.numpy())
    t = interleaved_seconds({"module_call": lambda: library(x), "bare_vm_call": lambda: vm["main"](arg)}, rounds)
    kernels = library_profile(library, x, "overhead")
    emit(bench="library_overhead", N=x.shape[1], module_call_ms=round(t["module_call"] * 1e3, 3),
         bare_vm_call_ms=round(t["bare_vm_call"] * 1e3, 3), kernels_ms=round(kernels * 1e3, 3),
         vm_overhead_ms=round((t["bare_vm_call"] - kernels) * 1e3, 3),
         conversion_ms=round((t["module_call"] - t["bare_vm_call"]) * 1e3, 3))


def bench_resnet19(quick, rounds, d):
    width = 0.25 if quick else 1.0
    for n in ((1,) if quick else (1, 16)):
        torch.manual_seed(0)
        net = resnet19(width=width).eval()
        x = torch.rand(n, 3, 32, 32)
        g = fold_tdbn(unroll_timesteps(snnc.trace(net, x), T=4).eval())
        eager = snnc.compile(g, target="torch")
        ref = eager(x)
        lib = exported(snnc.compile(g, target="tvm:llvm", mode="relax"), d, f"r19_{n}")
        fns = {"torch_eager": lambda: eager(x), "snnc_tvm_llvm_library": lambda: lib(x)}
        try:
            tc = torch.compile(eager.gm if hasattr(eager, "gm") else g)
            tc(x)
            fns["torch_compile"] = lambda: tc(x)
        except Exception as e:  # noqa: BLE001
            emit(bench="resnet19", N=n, impl="torch_compile", skipped=type(e).__name__)
        try:
            onnx = snnc.compile(g, target="onnx")
            fns["snnc_onnx"] = lambda: onnx(x)
        except Exception as e:  # noqa: BLE001
            emit(bench="resnet19", N=n, impl="snnc_onnx", skipped=type(e).__name__)
        emit(bench="resnet19", N=n, width=width, check="library_vs_eager", max_abs_diff=float((lib(x) - ref).abs().max()))
        with torch.no_grad():
            t = interleaved_seconds(fns, max(3, rounds // 2))
        base = t.get("torch_compile", t["torch_eager"])
        for k, v in t.items():
            emit(bench="resnet19", N=n, T=4, width=width, impl=k, ms=round(v * 1e3, 2),
                 ratio_to_torch_compile=round(v / base, 3), ratio_to_torch_eager=round(v / t["torch_eager"], 3))


def bench_compile(g):
    from snnc.targets import tvm_build
    old = os.environ.get("SNNC_CACHE_DIR")
    with tempfile.TemporaryDirectory() as d:
        os.environ["SNNC_CACHE_DIR"] = d
        tvm_build._MEMORY_CACHE.clear()
        t0 = time.perf_counter()
        snnc.compile(g, target="tvm:llvm", mode="relax")
        cold = time.perf_counter() - t0
        tvm_build._MEMORY_CACHE.clear()  # a new process: only the disk cache is left
        t0 = time.perf_counter()
        snnc.compile(g, target="tvm:llvm", mode="relax")
        disk = time.perf_counter() - t0
    if old is None:
        os.environ.pop("SNNC_CACHE_DIR", None)
    else:
        os.environ["SNNC_CACHE_DIR"] = old
    tvm_build._MEMORY_CACHE.clear()
    emit(bench="compile", graph="bench_net T=4", library_cold_s=round(cold, 2), library_cached_s=round(disk, 3))


def bench_tune(g, x, minutes, rounds, d):
    db = Path(d) / "tune_db"
    t0 = time.perf_counter()
    tuned = snnc.compile(g, target="tvm:llvm", mode="relax", tune=True, tune_minutes=minutes, database=db)
    tune_s = time.perf_counter() - t0
    from snnc.targets import tvm_build
    tvm_build._MEMORY_CACHE.clear()
    t0 = time.perf_counter()
    snnc.compile(g, target="tvm:llvm", mode="relax", tune=True, tune_minutes=minutes, database=db)
    reuse_s = time.perf_counter() - t0
    emit(bench="tune", graph=f"bench_net T=4 N={x.shape[1]}", tune_s=round(tune_s, 1), reuse_s=round(reuse_s, 3),
         tuning=tuned.meta.get("tuning"))
    untuned = snnc.compile(g, target="tvm:llvm", mode="relax")
    t = interleaved_seconds({"library_hand_schedule": lambda: untuned(x), "library_tuned": lambda: tuned(x)}, rounds)
    for k, v in t.items():
        emit(bench="tune", impl=k, ms=round(v * 1e3, 2), ratio_to_hand=round(v / t["library_hand_schedule"], 3))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="N=1,4, fewer rounds, small ResNet-19")
    p.add_argument("--tune", action="store_true", help="also MetaSchedule-tune the bench net's library")
    p.add_argument("--tune-minutes", type=float, default=10.0)
    p.add_argument("--no-resnet", action="store_true")
    args = p.parse_args(argv)
    rounds = 3 if args.quick else 9
    from snnc.targets.tvm_build import host_isa
    emit(bench="setup", torch_threads=torch.get_num_threads(), host=host_isa(), load_avg=os.getloadavg())
    sizes = (1, 4) if args.quick else (1, 16, 64)
    with tempfile.TemporaryDirectory() as d:
        # ONE exported library per build, compiled once at N=1 with a symbolic batch, serves every N
        g1 = unroll_timesteps(snnc.trace(scaled_bench_net(), torch.zeros(1, 3, 32, 32)), T=4)
        libraries = {}
        calib = torch.rand(4, 16, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2   # not a timed input
        digits = {"spike_digits": "auto", "calib": calib}
        for suffix, sc, extra in (("", "auto", {}), ("_vnni", "vnni", {}), ("_fp32", "fp32", {}),
                                  ("_digits_auto", "auto", digits)):
            try:
                lib = exported(snnc.compile(g1, target="tvm:llvm", mode="relax", spike_convs=sc, **extra), d,
                               f"bench_net{sc}{suffix}")
            except SnncError as e:  # no VNNI on this host
                emit(bench="bench_net", impl=f"snnc_tvm_llvm_library{suffix}", skipped=str(e))
                continue
            libraries[f"snnc_tvm_llvm_library{suffix}"] = lib
            emit(bench="bench_net", impl=f"snnc_tvm_llvm_library{suffix}", library_batch=lib.meta.get("library_batch"),
                 spike_convs=lib.meta.get("spike_convs"), **({"spike_digits": lib.meta["spike_digits"]}
                                                            if "spike_digits" in lib.meta else {}))
        for n in sizes:
            g, x = bench_net_at(n, rounds, d, libraries)
            if n == 1:
                library_overhead(libraries["snnc_tvm_llvm_library"], x, rounds * 3)
        for name, lib in libraries.items():
            library_profile(lib, x, name)
        bench_compile(g)
        if not args.no_resnet:
            bench_resnet19(args.quick, rounds, d)
        if args.tune:
            bench_tune(g, x, args.tune_minutes, rounds, d)


if __name__ == "__main__":
    sys.exit(main())
