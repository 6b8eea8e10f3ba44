"""Direct SNN training bench: accuracy on digits, tdBN vs no norm, and training-step speed.

    .venv/bin/python bench/training.py [--quick] [--only accuracy|tdbn|speed]

Prints one JSON line per result:
  * digits: conv SNN (zoo.digits_snn) trained directly at T=4 with rectangular vs atan surrogates
    (test accuracy, epochs, seconds);
  * tdbn: a deep plain conv LIF net (10 conv layers) with tdBN vs without normalisation, same
    epochs and seed (Zheng 2021's claim: tdBN trains where no-norm stalls);
  * speed: forward+backward time of one training step of the bench net (3 conv+LIF layers
    3->64->128->128, 32x32, T=4, N=16) for snnc's unrolled graph (native fused scan, and its
    torch-only fallback), spikingjelly 2.0 multi-step (step_mode='m', its CPU LIF op) and a naive
    per-timestep Python loop, same weights, same run; medians of interleaved repeats, as ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import snnc  # noqa: E402
from snnc.data import digits, loader  # noqa: E402
from snnc.ops import LIF, DirectEncoder, Readout, TDBatchNorm  # noqa: E402
from snnc.passes import insert_surrogate, unroll_timesteps  # noqa: E402
from snnc.zoo import bench_net, digits_snn  # noqa: E402


def emit(**row):
    print(json.dumps(row), flush=True)


def train_digits(model, kind, T, epochs, lr, seed=0):
    torch.manual_seed(seed)
    d = digits()
    g = insert_surrogate(unroll_timesteps(snnc.trace(model, torch.zeros(2, 1, 8, 8)), T=T), kind=kind)
    t0 = time.perf_counter()
    hist = snnc.retrain(g, loader(d.x_train, d.y_train, 64, shuffle=True, seed=seed), epochs=epochs, lr=lr,
                        val_loader=loader(d.x_test, d.y_test, 256), progress=False)
    return hist, time.perf_counter() - t0


def bench_accuracy(quick):
    epochs = 4 if quick else 10
    for kind in ("rectangular", "atan"):
        torch.manual_seed(0)
        hist, seconds = train_digits(digits_snn(16), kind, T=4, epochs=epochs, lr=3e-3)
        emit(bench="training", case="digits_direct", surrogate=kind, T=4, epochs=epochs,
             test_acc=round(hist[-1]["val_acc"], 2), best_test_acc=round(max(h["val_acc"] for h in hist), 2),
             seconds=round(seconds, 1))


def deep_plain_net(depth=10, width=16, tdbn=True):
    """Conv3x3 x depth, LIF (Zheng 2021: decay 0.5, v_th 0.5, hard reset, strict), no skips."""
    layers, cin = [DirectEncoder()], 1
    for _ in range(depth):
        layers.append(nn.Conv2d(cin, width, 3, padding=1, bias=not tdbn))
        if tdbn:
            layers.append(TDBatchNorm(width, v_th=0.5))
        layers.append(LIF(decay=0.5, v_th=0.5, reset="zero", compare=">"))
        cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(width * 4, 10), Readout())


def bench_tdbn(quick):
    epochs = 3 if quick else 5
    for tdbn in (True, False):
        torch.manual_seed(0)
        hist, seconds = train_digits(deep_plain_net(tdbn=tdbn), "rectangular", T=4, epochs=epochs, lr=3e-3)
        emit(bench="training", case="deep_plain_net", depth=10, norm="tdBN" if tdbn else "none", epochs=epochs,
             test_acc_per_epoch=[round(h["val_acc"], 1) for h in hist], seconds=round(seconds, 1))


def _spikingjelly_net(convs):
    from spikingjelly.activation_based import layer, neuron, surrogate
    mods = []
    for c in convs:
        conv = layer.Conv2d(c.in_channels, c.out_channels, 3, padding=1, step_mode="m")
        conv.load_state_dict(c.state_dict())
        # snnc LIF(tau=2): H = 0.5 V + X, reset by subtraction == LIFNode(decay_input=False, v_reset=None)
        mods += [conv, neuron.LIFNode(tau=2.0, decay_input=False, v_reset=None,
                                      surrogate_function=surrogate.ATan(), step_mode="m")]
    return nn.Sequential(*mods)


def bench_speed(quick, T=4, N=16):
    torch.manual_seed(0)
    net = bench_net()
    example = torch.zeros(N, 3, 32, 32)
    unrolled = insert_surrogate(unroll_timesteps(snnc.trace(net, example), T=T), kind="atan")
    per_step = insert_surrogate(snnc.trace(net, example), kind="atan")
    x = torch.rand(T, N, 3, 32, 32)
    runners = {"snnc": None, "snnc_torch_scan": None, "per_step_loop": None}
    try:
        from spikingjelly.activation_based import functional
        sj = _spikingjelly_net([m for m in net if isinstance(m, nn.Conv2d)])
        runners["spikingjelly"] = None
    except ImportError as e:
        sj = None
        emit(bench="training", case="speed", note=f"spikingjelly not installed ({e}); run `make bench-deps`")

    def set_native(on):
        os.environ["SNNC_NATIVE"] = "1" if on else "0"

    def step_snnc():
        set_native(True)
        unrolled.zero_grad(set_to_none=True)
        unrolled(x).sum().backward()

    def step_snnc_torch():
        set_native(False)
        unrolled.zero_grad(set_to_none=True)
        unrolled(x).sum().backward()

    def step_loop():
        per_step.zero_grad(set_to_none=True)
        snnc.reset(per_step)
        torch.stack([per_step(x[t]) for t in range(T)]).sum().backward()

    def step_sj():
        sj.zero_grad(set_to_none=True)
        functional.reset_net(sj)
        sj(x).sum().backward()

    fns = {"snnc": step_snnc, "snnc_torch_scan": step_snnc_torch, "per_step_loop": step_loop}
    if sj is not None:
        fns["spikingjelly"] = step_sj
    with torch.no_grad():   # same forward results: snnc native == torch scan == per-step == spikingjelly
        set_native(True)
        ref = unrolled(x)
        set_native(False)
        same = {"snnc_torch_scan": torch.equal(unrolled(x), ref)}
        snnc.reset(per_step)
        same["per_step_loop"] = torch.equal(torch.stack([per_step(x[t]) for t in range(T)]), ref)
        if sj is not None:
            functional.reset_net(sj)
            same["spikingjelly"] = torch.equal(sj(x), ref)
    set_native(True)
    times = {k: [] for k in fns}
    for fn in fns.values():   # warm-up (allocator, oneDNN primitives, native build)
        fn()
    for _ in range(3 if quick else 7):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    os.environ.pop("SNNC_NATIVE", None)
    med = {k: statistics.median(v) for k, v in times.items()}
    for name in fns:
        if name == "snnc":
            continue
        emit(bench="training", case="speed", net="bench_net 3->64->128->128 32x32", T=T, N=N,
             threads=torch.get_num_threads(), peer=name, snnc_step_s=round(med["snnc"], 3),
             peer_step_s=round(med[name], 3), speedup=round(med[name] / med["snnc"], 2),
             same_forward=same[name], repeats=len(times[name]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and repeats")
    ap.add_argument("--only", choices=("accuracy", "tdbn", "speed"))
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    for name, fn in (("accuracy", bench_accuracy), ("tdbn", bench_tdbn), ("speed", bench_speed)):
        if args.only in (None, name):
            # the digits nets have tiny tensors: one thread avoids thread-pool sync on a shared CPU
            torch.set_num_threads(threads if name == "speed" else 1)
            fn(args.quick)


if __name__ == "__main__":
    main()
