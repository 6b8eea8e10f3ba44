"""Inference on the bench net against torch.compile: snnc's CPU targets, fp32 and with the int8
spike kernels, in one run (interleaved, medians), as ratios to torch.compile; JSON lines.

    .venv/bin/python bench/inference.py [--quick] [--N 16] [--rounds 9]

Net: zoo.bench_net (3x3 conv + LIF, 3->64->128->128, 32x32), T=4, input [T, N, 3, 32, 32]; conv
weights scaled x4 so that every layer fires (per-layer firing rates are printed). Peers, same
weights: a plain ~20-line multi-step torch loop (conv on T*N, LIF loop over T) run eagerly and
under ``torch.compile``, spikingjelly multi-step when installed. snnc: ``torch`` (the reference
graph), ``onnx``, ``tvm:llvm`` with ``spike_int8=False`` (hybrid, fp32 convs raced against TVM)
and ``tvm:llvm`` as compiled by default (on an AMX/VNNI CPU: fused conv+LIF blocks, convs on
spikes race the int8 kernels; the line names the ISA and each layer's runner, digits, stated
error bound and spike format, and ``race_ms``: each runner's time in the compile-time race). Where
the host offers more than one spike-block runner (a VNNI host without AMX: oneDNN ``int8`` blocks
and ``fused`` TVM blocks), the same module with every block forced to each runner is timed too
(``snnc_tvm_llvm_int8_blocks`` / ``_fused_blocks``), and where the kernels run on torch's
OpenMP threads (``kernel_threads``), the default module on TVM's own pool
(``snnc_tvm_llvm_default_tvm_pool``). ``snnc_tvm_llvm_digits_auto``: the default module with
``spike_digits="auto"`` (one int8 weight digit in each spike conv whose output spikes on a separate
calibration draw still agree >= 99.9% with the fp32 reference; ``spike_digits`` on its line: the
measured agreement per conv); its agreement below is measured on the timed input, not the
calibration one. Each line: median ms,
``ratio_vs_torch_compile``, ``cpu_ratio_vs_torch_compile`` (process CPU time, which load from
other processes inflates less than wall time) and spike agreement with the reference (fraction
of equal outputs).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

# bench/tvm.py would shadow the tvm package when bench/ is sys.path[0]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import snnc  # noqa: E402
from snnc.differential import unavailable_reason  # noqa: E402
from snnc.ops import LIF  # noqa: E402
from snnc.passes import unroll_timesteps  # noqa: E402
from snnc.targets.spike_block import SpikeBlock  # noqa: E402
from snnc.zoo import bench_net  # noqa: E402


def emit(**row):
    print(json.dumps(row), flush=True)


class PlainLoop(nn.Module):
    """What a user writes by hand: convs on the T*N batch, LIF (snnc's semantics: decay, subtract
    reset, >= threshold) as a Python loop over T."""

    def __init__(self, net):
        super().__init__()
        self.convs = nn.ModuleList(m for m in net if isinstance(m, nn.Conv2d))
        self.decays = [m.decay for m in net if isinstance(m, LIF)]

    def forward(self, x):
        T, N = x.shape[:2]
        for conv, decay in zip(self.convs, self.decays):
            y = conv(x.flatten(0, 1)).unflatten(0, (T, N))
            v, out = torch.zeros_like(y[0]), []
            for t in range(T):
                v = decay * v + y[t]
                s = (v >= 1.0).float()
                v = v - s
                out.append(s)
            x = torch.stack(out)
        return x


def firing_net(gain=4.0, seed=0):
    torch.manual_seed(seed)
    net = bench_net()
    with torch.no_grad():
        for conv in net[0::2]:
            conv.weight *= gain
    return net.eval()


# TVM's own thread pool and onnxruntime's spin for a while after a call, and the next call (another
# library's) would share the cores with them: the module timed right after the TVM-pool variant ran
# 40% slower at N=64 (279 vs 196 ms alone). A pause follows those rows, and the TVM-pool row runs last
# in a round. (A pause after every row moved other rows instead: torch.compile +45% after 1 s idle.)
PAUSE_S = 0.3
SPINNING = ("snnc_onnx", "snnc_tvm_llvm_default_tvm_pool")


def calibration(T, N, seed=1):
    """Calibration inputs for ``spike_digits="auto"``: the timed input's distribution, another draw."""
    return torch.rand(T, N, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2


def firing_rates(g, x):
    rates, hooks = [], [m.register_forward_hook(lambda m, i, o: rates.append(round(float(o.mean()), 3)))
                        for m in g.modules() if isinstance(m, LIF)]
    snnc.run(g, x)
    for h in hooks:
        h.remove()
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="N=4, 3 rounds: checks the script works")
    ap.add_argument("--N", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    args = ap.parse_args(argv)
    N = args.N or (4 if args.quick else 16)
    rounds = args.rounds or (3 if args.quick else 9)
    T = 4
    net = firing_net()
    x = torch.rand(T, N, 3, 32, 32) * 2
    g = unroll_timesteps(snnc.trace(net, x[0]), T=T)
    ref = snnc.run(g, x)
    emit(bench="inference", net="bench_net", T=T, N=N, firing_rates=firing_rates(g, x))

    plain = PlainLoop(net).eval()
    fns, outs = {}, {}
    with torch.no_grad():
        fns["plain_loop_eager"] = lambda: plain(x)
        compiled = torch.compile(plain)
        t0 = time.perf_counter()
        compiled(x)
        emit(bench="inference", impl="plain_loop_torch_compile", compile_s=round(time.perf_counter() - t0, 1))
        fns["plain_loop_torch_compile"] = lambda: compiled(x)
    try:
        from spikingjelly.activation_based import functional, layer, neuron
        sj = nn.Sequential(*[layer.SeqToANNContainer(m) if isinstance(m, nn.Conv2d) else
                             neuron.LIFNode(tau=m.tau, decay_input=m.decay_input, v_reset=None, step_mode="m") for m in net]).eval()

        def run_sj():
            functional.reset_net(sj)
            return sj(x)
        fns["spikingjelly_m"] = run_sj
    except ImportError:
        emit(bench="inference", impl="spikingjelly_m", skipped="spikingjelly not installed")
    snnc_targets = {"snnc_torch": ("torch", {}), "snnc_onnx": ("onnx", {}),
                    "snnc_tvm_llvm_fp32": ("tvm:llvm", {"spike_int8": False}),
                    "snnc_tvm_llvm_default": ("tvm:llvm", {}),
                    "snnc_tvm_llvm_digits_auto": ("tvm:llvm", {"spike_digits": "auto", "calib": calibration(T, N)})}
    for label, (target, options) in snnc_targets.items():
        why = unavailable_reason(target)
        if why:
            emit(bench="inference", impl=label, skipped=why)
            continue
        t0 = time.perf_counter()
        m = snnc.compile(g, target=target, **options)
        extra = {k: m.meta[k] for k in ("hybrid_convs", "spike_int8", "int8_isa", "spike_layers", "kernel_threads",
                                        "spike_digits")
                 if k in m.meta}
        blocks = [b for b in m._hybrid.modules() if isinstance(b, SpikeBlock)] if target == "tvm:llvm" else []
        races = {b.name: b.race_ms for b in blocks if hasattr(b, "race_ms")}  # absent when the choice was cached
        emit(bench="inference", impl=label, compile_s=round(time.perf_counter() - t0, 1), **extra,
             **({"race_ms": races} if races else {}))
        fns[label] = (lambda m: lambda: m(x))(m)
        runners = {b.name: b.options() for b in blocks}
        if label == "snnc_tvm_llvm_default" and len({r for o in runners.values() for r in o} - {"torch"}) > 1:
            fns.update(forced_runners(g, x, runners))  # each spike-block runner on every layer, same run
        if label == "snnc_tvm_llvm_default" and m.meta.get("kernel_threads") == "torch-openmp":
            fns.update(tvm_pool(g, x, m.meta["hybrid_convs"]))
    if "snnc_tvm_llvm_default_tvm_pool" in fns:   # last in a round (SPINNING)
        fns["snnc_tvm_llvm_default_tvm_pool"] = fns.pop("snnc_tvm_llvm_default_tvm_pool")
    times, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    with torch.no_grad():
        for k, fn in fns.items():
            outs[k] = fn()  # warm-up, and the output checked below
        for _ in range(rounds):
            for k, fn in fns.items():
                c0, t0 = _cpu_seconds(), time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(_cpu_seconds() - c0)
                if k in SPINNING:   # its thread pool spins on after the call: let it stop first
                    time.sleep(PAUSE_S)
    base = statistics.median(times["plain_loop_torch_compile"])
    cpu_base = statistics.median(cpu["plain_loop_torch_compile"])
    for k, v in times.items():
        ms = statistics.median(v)
        emit(bench="inference", impl=k, N=N, T=T, median_ms=round(ms * 1e3, 2),
             ratio_vs_torch_compile=round(ms / base, 3), rounds=rounds, threads=torch.get_num_threads(),
             cpu_ratio_vs_torch_compile=round(statistics.median(cpu[k]) / cpu_base, 3),
             spike_agreement=round(float((outs[k] == ref).float().mean()), 6))


def _cpu_seconds():
    """This process's CPU time (user + system, every thread): a second measure next to wall time
    that load from other processes on the machine inflates less."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def forced_runners(g, x, runners):
    """``{label: fn}``: the default ``tvm:llvm`` module with every spike block forced to one runner
    (oneDNN ``int8`` blocks; the ``fused`` TVM blocks where the host offers them), the first,
    analog block as the race left it unless it can run fused too."""
    from snnc.targets.tvm_hybrid import apply_conv_choices
    fns = {}
    for runner in ("int8", "fused"):
        m = snnc.compile(g, target="tvm:llvm")
        want = {name: runner if runner in o else m.meta["hybrid_convs"][name] for name, o in runners.items()}
        emit(bench="inference", impl=f"snnc_tvm_llvm_{runner}_blocks", hybrid_convs=apply_conv_choices(m._hybrid, want))
        fns[f"snnc_tvm_llvm_{runner}_blocks"] = (lambda m: lambda: m(x))(m)
    return fns


def tvm_pool(g, x, choices):
    """``{label: fn}``: the default module with its kernels on TVM's own thread pool instead of
    torch's OpenMP team (``SNNC_TVM_THREADS=tvm``, targets/tvm_parallel.py), same runners."""
    import os
    from snnc.targets.tvm_hybrid import apply_conv_choices
    os.environ["SNNC_TVM_THREADS"] = "tvm"
    try:
        m = snnc.compile(g, target="tvm:llvm", cache=False)  # a cached library keeps its first hooks
    finally:
        del os.environ["SNNC_TVM_THREADS"]
    emit(bench="inference", impl="snnc_tvm_llvm_default_tvm_pool", kernel_threads=m.meta["kernel_threads"],
         hybrid_convs=apply_conv_choices(m._hybrid, choices))
    return {"snnc_tvm_llvm_default_tvm_pool": lambda: m(x)}


if __name__ == "__main__":
    main()
