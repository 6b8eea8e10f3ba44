"""Latency of every available target against torch eager, in one run (ratios, JSON lines).

    .venv/bin/python bench/targets.py [--quick]

Nets: the bench net (3x3 conv + LIF, 3->64->128->128, 32x32, T=4, N=16, sequence input) and the
digits CNN turned SNN (ReLU -> IF, direct encoding, membrane readout, T=8, N=64). Each target is
compiled from the same unrolled graph; the calls are interleaved round-robin (torch, onnx, tvm...,
torch, ...) so that machine load hits every target alike, and each line reports the median over
the rounds and ``ratio_vs_torch`` = median target time / median torch-eager time (< 1: faster).
``max_diff`` is the largest output difference against the reference interpreter. ``onnx:scan``
is the onnx target with ``loop="scan"`` (one ONNX Scan per neuron instead of the unrolled loop).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# run as a script, bench/ is sys.path[0] and bench/tvm.py would shadow the tvm package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import torch  # noqa: E402
from torch import nn  # noqa: E402

import snnc  # noqa: E402
from snnc.compiled import TARGETS  # noqa: E402
from snnc.differential import unavailable_reason  # noqa: E402
from snnc.ops import IF, DirectEncoder, Readout  # noqa: E402
from snnc.passes import unroll_timesteps  # noqa: E402
from snnc.zoo import bench_net, digits_cnn  # noqa: E402


def digits_if_snn(width=16):
    """digits_cnn without BN, every ReLU an IF neuron: the shape of a converted digits CNN."""
    ann = digits_cnn(width, bn=False)
    layers = [IF() if isinstance(m, nn.ReLU) else m for m in ann if not isinstance(m, nn.Dropout)]
    return nn.Sequential(DirectEncoder(), *layers, Readout("membrane")).eval()


def nets(quick):
    n = 4 if quick else 16
    yield "bench_net", unroll_timesteps(snnc.trace(bench_net(), torch.zeros(n, 3, 32, 32)), T=4), \
        torch.rand(4, n, 3, 32, 32) * 2
    n = 16 if quick else 64
    yield "digits_if_snn", unroll_timesteps(snnc.trace(digits_if_snn(), torch.zeros(n, 1, 8, 8)), T=8), \
        torch.rand(n, 1, 8, 8)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller batches, fewer rounds")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(),
                    help="intra-op threads for torch and onnxruntime alike (1 is steadier on a busy machine)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)  # onnxruntime sessions take torch's thread count
    rounds = args.rounds or (3 if args.quick else 9)
    for name, g, x in nets(args.quick):
        ref = snnc.run(g, x)
        modules = {}
        for target in TARGETS:
            why = unavailable_reason(target) or ("integer-only target" if target == "tvm:int" else None)
            if why:
                print(json.dumps({"bench": "targets", "net": name, "target": target, "skipped": why}))
                continue
            variants = [("onnx", {}), ("onnx:scan", {"loop": "scan"})] if target == "onnx" else [(target, {})]
            for label, options in variants:
                t0 = time.perf_counter()
                m = modules[label] = snnc.compile(g, target=target, **options)
                m.compile_s = time.perf_counter() - t0
                m.max_diff = float((m(x) - ref).abs().max())  # also the warm-up call
        times = {t: [] for t in modules}
        for _ in range(rounds):
            for t, m in modules.items():
                t0 = time.perf_counter()
                m(x)
                times[t].append(time.perf_counter() - t0)
        torch_ms = 1e3 * statistics.median(times["torch"])
        for t, m in modules.items():
            ms = 1e3 * statistics.median(times[t])
            print(json.dumps({"bench": "targets", "net": name, "target": t, "input": list(x.shape),
                              "T": g.snnc_spec["T"], "median_ms": round(ms, 2),
                              "ratio_vs_torch": round(ms / torch_ms, 3), "rounds": rounds, "threads": args.threads,
                              "compile_s": round(m.compile_s, 2), "max_diff": m.max_diff}))


if __name__ == "__main__":
    main()
