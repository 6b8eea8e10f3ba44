"""Benchmark of the TVM targets: one JSON line per result, latencies as ratios to torch eager
measured in the same run (median of interleaved runs).

    .venv/bin/python bench/tvm.py [--quick] [--relax]

* bench net (3x3 conv + LIF, 3->64->128->128, 32x32, T=4, N=16): torch eager (the unrolled
  graph, target ``torch``), spikingjelly multi-step (same weights, ``LIFNode(step_mode="m")``),
  snnc ``tvm:llvm`` (default = hybrid), and with ``--relax`` the standalone Relax module (the
  exported artefact) built for the host CPU and for portable x86-64;
* a converted-style digits CNN (``digits_cnn`` with ReLU -> IF, direct input, membrane readout,
  T=8, N=256): the same peers;
* compile time of the bench net, cold (fresh cache) and cached;
* the LIF scan alone, [T,N,C,H,W] = [4,16,128,32,32]: torch eager's per-step loop vs the fused
  TVM kernel, with and without ``mcpu`` set to the host CPU.
The onnxruntime peer is left out: this branch has no ``onnx`` target.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

# this file is named tvm.py: drop its folder from the path so `import tvm` finds TVM, not us
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
from torch import nn

import snnc  # noqa: E402
from snnc.ops import IF, LIF, DirectEncoder, Readout
from snnc.passes import unroll_timesteps
from snnc.zoo import bench_net, digits_cnn


def emit(**kw):
    print(json.dumps(kw), flush=True)


def race(fns: dict, runs: int) -> dict:
    """Median seconds per callable, runs interleaved so load changes hit every peer alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def spikingjelly_net(model: nn.Sequential, T: int):
    """The same net in spikingjelly's multi-step mode (shared weights), or None if not installed."""
    try:
        from spikingjelly.activation_based import functional, layer, neuron
    except ImportError:
        return None
    layers = []
    for m in model:
        if isinstance(m, LIF):
            layers.append(neuron.LIFNode(tau=m.tau, decay_input=m.decay_input, v_threshold=float(m.v_th),
                                         v_reset=None, step_mode="m"))
        elif isinstance(m, IF):
            layers.append(neuron.IFNode(v_threshold=1.0, v_reset=None, step_mode="m"))
        elif isinstance(m, DirectEncoder):
            continue
        elif isinstance(m, Readout):
            continue
        else:
            layers.append(layer.SeqToANNContainer(m))
    net = nn.Sequential(*layers).eval()

    def run(x_seq, readout=False):
        functional.reset_net(net)
        with torch.no_grad():
            y = net(x_seq)
        return y.mean(0) if readout else y
    return run


def bench_model(name, model, x, T, runs, relax, static_input):
    g = unroll_timesteps(snnc.trace(model.eval(), x if static_input else x[0]), T=T)
    eager = snnc.compile(g, target="torch")
    tvm_hybrid = snnc.compile(g, target="tvm:llvm")
    fns = {"torch_eager": lambda: eager(x), "snnc_tvm_llvm": lambda: tvm_hybrid(x)}
    sj = spikingjelly_net(model, T)
    if sj is not None:
        x_seq = x.unsqueeze(0).expand(T, *x.shape).contiguous() if static_input else x
        fns["spikingjelly_m"] = lambda: sj(x_seq, readout=static_input)
        ref, got = eager(x), sj(x_seq, readout=static_input)
        emit(bench=name, check="spikingjelly_vs_eager", max_abs_diff=float((ref - got).abs().max()))
    diff = float((tvm_hybrid(x) - eager(x)).abs().max())
    emit(bench=name, check="tvm_vs_eager", max_abs_diff=diff)
    if relax:  # the exportable artefact: host ISA (default) and portable x86-64 (mcpu=None)
        standalone = snnc.compile(g, target="tvm:llvm", mode="relax")
        portable = snnc.compile(g, target="tvm:llvm", mode="relax", mcpu=None)
        fns["snnc_tvm_llvm_relax"] = lambda: standalone(x)
        fns["snnc_tvm_llvm_relax_portable"] = lambda: portable(x)
        emit(bench=name, check="tvm_relax_vs_eager_spike_agreement" if not static_input else
             "tvm_relax_vs_eager_max_abs_diff", value=float((standalone(x) == eager(x)).float().mean()
                                                           if not static_input else (standalone(x) - eager(x)).abs().max()))
    t = race(fns, runs if not relax else max(3, runs // 3))
    for k, v in t.items():
        emit(bench=name, impl=k, ms=round(v * 1e3, 2), ratio_to_torch_eager=round(v / t["torch_eager"], 3))
    return g


def bench_profile(g, x, runs):
    """Where the hybrid's time goes: each node of the hybrid graph timed alone (median)."""
    from torch import fx

    from snnc.targets.tvm_hybrid import TVMConvCall, TVMKernelCall
    m = snnc.compile(g, target="tvm:llvm")
    hg = m._hybrid
    times = {}

    class Timed(fx.Interpreter):
        def run_node(self, n):
            t0 = time.perf_counter()
            out = super().run_node(n)
            times.setdefault(n.name, []).append(time.perf_counter() - t0)
            return out
    with torch.no_grad():
        for _ in range(runs):
            Timed(hg).run(x)
    total = sum(statistics.median(v) for v in times.values())
    for n in hg.graph.nodes:
        if n.name in times and n.op == "call_module":
            mod = hg.get_submodule(n.target)
            if isinstance(mod, TVMConvCall):
                kind = f"conv2d in {'tvm' if mod.use_tvm else 'torch'}"
            else:
                kind = f"tvm {mod.name}" if isinstance(mod, TVMKernelCall) else type(mod).__name__
            ms = statistics.median(times[n.name]) * 1e3
            emit(bench="hybrid_profile", node=n.name, op=kind, ms=round(ms, 2), share=round(ms / 1e3 / total, 3))


def bench_compile(g):
    from snnc.targets import tvm_build
    with tempfile.TemporaryDirectory() as d:
        os.environ["SNNC_CACHE_DIR"] = d
        tvm_build._MEMORY_CACHE.clear()
        t0 = time.perf_counter()
        m = snnc.compile(g, target="tvm:llvm")
        t_hybrid = time.perf_counter() - t0
        t0 = time.perf_counter()
        m.export(os.path.join(d, "net.so"))  # builds the standalone Relax library
        t_relax = time.perf_counter() - t0
        tvm_build._MEMORY_CACHE.clear()  # a new process: only the disk cache is left
        t0 = time.perf_counter()
        snnc.compile(g, target="tvm:llvm")
        t_disk = time.perf_counter() - t0
        t0 = time.perf_counter()
        snnc.compile(g, target="tvm:llvm")
        t_mem = time.perf_counter() - t0
    emit(bench="compile", graph="bench_net T=4 N=16", cold_hybrid_s=round(t_hybrid, 2),
         cold_relax_library_s=round(t_relax, 2), cached_disk_s=round(t_disk, 3), cached_memory_s=round(t_mem, 3))


def bench_lif_kernel(runs):
    from snnc.targets import tvm_build as tb
    from snnc.targets.tvm_hybrid import TVMKernelCall
    from snnc.targets.tvm_kernels import neuron_scan_kernel, pick_lanes
    from snnc.targets.tvm_lower import neuron_scan
    shape = (4, 16, 128, 32, 32)
    x = torch.randn(shape) * 1.5
    lif = LIF(tau=2.0, step_mode="m")
    rule, _ = neuron_scan(lif, shape[2:])
    fns = {"torch_eager": lambda: lif(x)}
    for label, mcpu in (("tvm_kernel", None), ("tvm_kernel_mcpu_host", "host")):
        lib = tb.build_kernels({"k": neuron_scan_kernel(4, None, "float32", rule, lanes=pick_lanes(128 * 32 * 32))},
                               tb.llvm_target(mcpu))
        call = TVMKernelCall("scan", "k")
        call.bind(lib)
        assert torch.equal(call(x), lif(x))
        fns[label] = (lambda c: lambda: c(x))(call)
    try:
        compiled = torch.compile(lif.multi_step)
        compiled(x)
        fns["torch_compile"] = lambda: compiled(x)
    except Exception as e:  # no C++ compiler for inductor, etc.
        emit(bench="lif_kernel", impl="torch_compile", skipped=f"{type(e).__name__}")
    t = race(fns, runs)
    for k, v in t.items():
        emit(bench="lif_kernel", shape=list(shape), impl=k, ms=round(v * 1e3, 3),
             speedup_vs_torch_eager=round(t["torch_eager"] / v, 2))


def converted_digits_net(width=16):
    """digits_cnn with every ReLU replaced by an IF neuron (subtract reset), direct input and a
    membrane readout: the shape of what ANN->SNN conversion produces (weights untrained here)."""
    ann = digits_cnn(width).eval()
    layers = [DirectEncoder()] + [IF() if isinstance(m, nn.ReLU) else m for m in ann] + [Readout("membrane")]
    return nn.Sequential(*layers)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer runs, smaller batches")
    p.add_argument("--relax", action="store_true", help="also time the standalone Relax module (slow convs)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    runs = 5 if args.quick else 15
    n = 4 if args.quick else 16
    from snnc.targets.tvm_build import host_isa
    emit(bench="setup", torch_threads=torch.get_num_threads(), host=host_isa())
    x = torch.randn(4, n, 3, 32, 32)
    g = bench_model("bench_net", bench_net(), x, 4, runs, args.relax, static_input=False)
    bench_model("converted_digits_cnn", converted_digits_net(), torch.rand(64 if args.quick else 256, 1, 8, 8),
                8, runs, args.relax, static_input=True)
    bench_profile(g, x, runs)
    bench_compile(g)
    bench_lif_kernel(runs)


if __name__ == "__main__":
    sys.exit(main())
