"""Two-state and recurrent peer neurons on tvm:llvm: an snntorch ``Synaptic`` MLP (Linear 784->256,
Synaptic, Linear 256->10, Synaptic; T=25, N=64) and the same with ``RSynaptic`` (all-to-all
recurrence), traced with ``snnc.trace`` and compiled to torch and tvm:llvm, timed against snntorch's
own per-step loop and ``torch.compile`` of that loop, interleaved in one process (median of
rounds). Prints one JSON line per result: compile seconds, milliseconds per forward, ratio vs
snntorch (> 1: snnc faster), spike identity with snntorch and per-layer firing rates.

    .venv/bin/python -P bench/peer_scan.py [--quick]
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

import torch
from torch import nn

import snnc


def _net(recurrent: bool, hidden: int):
    import snntorch as snn
    torch.manual_seed(0)
    if recurrent:
        l1 = snn.RSynaptic(alpha=0.8, beta=0.9, linear_features=hidden, init_hidden=True)
        l2 = snn.RSynaptic(alpha=0.8, beta=0.9, linear_features=10, init_hidden=True)
    else:
        l1 = snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True)
        l2 = snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True)
    m = nn.Sequential(nn.Linear(784, hidden), l1, nn.Linear(hidden, 10), l2).eval()
    with torch.no_grad():   # weights that make both layers fire (rates reported below)
        m[0].weight.normal_(0.0, 0.08)
        m[2].weight.normal_(0.0, 0.35)
        for p in m.modules():
            if isinstance(p, nn.Linear) and p is not m[0] and p is not m[2]:
                p.weight.normal_(0.0, 0.05)
    return m


def _snntorch_loop(m):
    from snntorch import utils

    def run(x):
        utils.reset(m)
        for layer in m:   # utils.reset leaves RSynaptic's previous spikes; snnc's S[-1] = 0
            if hasattr(layer, "spk"):
                layer.spk = torch.zeros_like(layer.spk)
        with torch.no_grad():
            return torch.stack([m(xt) for xt in x])
    return run


def _rates(m, x):
    _snntorch_loop(m)(x[:1])   # a fresh state
    from snntorch import utils
    utils.reset(m)
    for layer in m:
        if hasattr(layer, "spk"):
            layer.spk = torch.zeros_like(layer.spk)
    h = None
    with torch.no_grad():
        spikes = {1: [], 3: []}
        for xt in x:
            h = xt
            for i, layer in enumerate(m):
                h = layer(h)
                if i in spikes:
                    spikes[i].append(h)
    return [round(float(torch.stack(v).mean()), 4) for v in spikes.values()]


def bench(recurrent, T, N, hidden, rounds):
    m = _net(recurrent, hidden)
    x = (torch.rand(T, N, 784) < 0.3).float()
    theirs = _snntorch_loop(m)
    ref = theirs(x)
    g = snnc.passes.unroll_timesteps(snnc.trace(m, x[0]), T=T)
    runners, compile_s = {"snntorch": theirs}, {}
    for target in ("torch", "tvm:llvm"):
        t0 = time.perf_counter()
        c = snnc.compile(g, target, cache=False) if target != "torch" else snnc.compile(g, target)
        compile_s[target] = time.perf_counter() - t0
        runners[f"snnc {target}"] = c
        if target == "tvm:llvm":
            mode = c.meta.get("compiled_mode")
    try:
        t0 = time.perf_counter()
        loop = torch.compile(_snntorch_loop(m))
        loop(x)
        compile_s["torch.compile"] = time.perf_counter() - t0
        runners["torch.compile"] = loop
    except Exception as e:  # noqa: BLE001 - report, keep the others
        print(json.dumps({"bench": "peer_scan", "runner": "torch.compile", "error": str(e).splitlines()[0]}))
    same = {k: bool(torch.equal(ref, r(x))) for k, r in runners.items()}
    times = {k: [] for k in runners}
    for _ in range(rounds):          # interleaved: every runner once per round
        for k, r in runners.items():
            t0 = time.perf_counter()
            r(x)
            times[k].append(time.perf_counter() - t0)
    base = statistics.median(times["snntorch"])
    for k, ts in times.items():
        med = statistics.median(ts)
        print(json.dumps({"bench": "peer_scan", "model": "RSynaptic MLP" if recurrent else "Synaptic MLP",
                          "T": T, "N": N, "hidden": hidden, "runner": k,
                          "tvm_mode": mode if k == "snnc tvm:llvm" else None,
                          "compile_s": round(compile_s.get(k.replace("snnc ", ""), 0.0), 2),
                          "ms": round(1e3 * med, 3), "ratio_vs_snntorch": round(base / med, 2),
                          "spikes_identical": same[k], "firing_rates": _rates(m, x)}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (checks the script works)")
    ap.add_argument("--only", choices=("synaptic", "rsynaptic"))
    args = ap.parse_args()
    torch.set_num_threads(1)  # the machine is shared: compare single-threaded
    rounds = 3 if args.quick else 15
    for rec in (False, True):
        if args.only and args.only != ("rsynaptic" if rec else "synaptic"):
            continue
        bench(rec, T=25, N=64, hidden=256, rounds=rounds)


if __name__ == "__main__":
    main()
