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
error bound and spike format). Each line: median ms, ``ratio_vs_torch_compile`` and spike
agreement with the reference (fraction of equal outputs).
"""
from __future__ import annotations

import argparse
import json
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
                    "snnc_tvm_llvm_default": ("tvm:llvm", {})}
    for label, (target, options) in snnc_targets.items():
        why = unavailable_reason(target)
        if why:
            emit(bench="inference", impl=label, skipped=why)
            continue
        t0 = time.perf_counter()
        m = snnc.compile(g, target=target, **options)
        extra = {k: m.meta[k] for k in ("hybrid_convs", "spike_int8", "int8_isa", "spike_layers") if k in m.meta}
        emit(bench="inference", impl=label, compile_s=round(time.perf_counter() - t0, 1), **extra)
        fns[label] = (lambda m: lambda: m(x))(m)
    times = {k: [] for k in fns}
    with torch.no_grad():
        for k, fn in fns.items():
            outs[k] = fn()  # warm-up, and the output checked below
        for _ in range(rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["plain_loop_torch_compile"])
    for k, v in times.items():
        ms = statistics.median(v)
        emit(bench="inference", impl=k, N=N, T=T, median_ms=round(ms * 1e3, 2),
             ratio_vs_torch_compile=round(ms / base, 3), rounds=rounds, threads=torch.get_num_threads(),
             spike_agreement=round(float((outs[k] == ref).float().mean()), 6))


if __name__ == "__main__":
    main()
