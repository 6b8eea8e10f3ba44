"""Direct SNN training bench: accuracy on digits, tdBN vs no norm, and training-step speed.

    .venv/bin/python bench/training.py [--quick] [--only accuracy|tdbn|speed]

Prints one JSON line per result:
  * digits: conv SNN (zoo.digits_snn) trained directly at T=4 with rectangular vs atan surrogates
    (test accuracy, epochs, seconds);
  * tdbn: a deep plain conv LIF net (10 conv layers) with tdBN vs without normalisation, same
    epochs and seed (Zheng 2021's claim: tdBN trains where no-norm stalls);
  * memory: peak memory (and time) of one training step of the bench net at T=8 and T=32 for
    snnc (spikes saved as uint8; retrain's default saved_state="auto": no membrane kept after the
    cheap first conv, recomputed in backward; "recompute": none kept after any conv; "float32":
    kept everywhere, the earlier default; all three give the same gradient bits; int8 / float32 /
    exact conv modes), snnc with the membrane saved as float16 (``scan_state``), spikingjelly and
    torch.compile of a plain multi-step loop, each in a fresh process;
  * speed: forward+backward time of one training step of the bench net (3 conv+LIF layers
    3->64->128->128, 32x32, T=4, N=16) for snnc's unrolled graph (retrain's default: int8 forward
    of the convs fed by spikes, native fused scan, saved_state="auto"; and its other saved_state and
    conv modes and the torch-only scan), torch.compile of a plain multi-step loop, spikingjelly 2.0 multi-step
    (step_mode='m', its CPU LIF op) and a naive per-timestep Python loop, same weights, same run;
    medians of interleaved repeats, as ratios, with each one's spike agreement against the
    exact fp32 step and the per-layer firing rates.
"""
from __future__ import annotations

import argparse
import json
import os
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
from snnc.report import firing_rates, interleaved_seconds  # noqa: E402
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


def _firing_bench_net():
    """The bench net with conv 2 and 3 weights x4: on ``rand * 2`` input every layer then fires
    (~8.5% each); with the default init layers 2-3 stay silent and their spikes compare trivially."""
    torch.manual_seed(0)
    net = bench_net()
    with torch.no_grad():
        for conv in [m for m in net if isinstance(m, nn.Conv2d)][1:]:
            conv.weight.mul_(4.0)
    return net


def bench_speed(quick, T=4, N=16):
    """snnc's training step (retrain's default: int8 spike convs; and the float32 / exact conv
    modes, and the torch scan instead of the native one) against peers, interleaved in one process."""
    # what snnc.retrain does first; every peer in this process gets the same allocator behaviour
    from snnc.training import reuse_freed_memory, scan_state, spike_convs
    reuse_freed_memory()
    net = _firing_bench_net()
    example = torch.zeros(N, 3, 32, 32)
    unrolled = insert_surrogate(unroll_timesteps(snnc.trace(net, example), T=T), kind="atan")
    per_step = insert_surrogate(snnc.trace(net, example), kind="atan")
    x = torch.rand(T, N, 3, 32, 32) * 2   # with _firing_bench_net: every layer fires
    try:
        from spikingjelly.activation_based import functional
        sj = _spikingjelly_net([m for m in net if isinstance(m, nn.Conv2d)])
    except ImportError as e:
        sj = None
        emit(bench="training", case="speed", note=f"spikingjelly not installed ({e}); run `make bench-deps`")

    def snnc_step(mode, native=True):
        state, convs = SNNC_MODES[mode]

        def step():
            os.environ["SNNC_NATIVE"] = "1" if native else "0"
            unrolled.zero_grad(set_to_none=True)
            with scan_state(state), spike_convs(convs):
                out = unrolled(x)
                out.sum().backward()
            return out
        return step

    def step_loop():
        per_step.zero_grad(set_to_none=True)
        snnc.reset(per_step)
        out = torch.stack([per_step(x[t]) for t in range(T)])
        out.sum().backward()
        return out

    def step_sj():
        sj.zero_grad(set_to_none=True)
        functional.reset_net(sj)
        out = sj(x)
        out.sum().backward()
        return out

    compiled = torch.compile(_plain_loop_step(nn.ModuleList(m for m in net if isinstance(m, nn.Conv2d))))

    def step_compiled():
        net.zero_grad(set_to_none=True)
        out = compiled(x)
        out.sum().backward()
        return out

    fns = {name: snnc_step(name) for name in SNNC_MODES if name != "snnc_float16_state"}
    fns.update(snnc_torch_scan=snnc_step("snnc", native=False), per_step_loop=step_loop,
               plain_loop_torch_compile=step_compiled)
    if sj is not None:
        fns["spikingjelly"] = step_sj
    # spike agreement of each runner's output with snnc's exact-conv step (the fp32 reference;
    # per-step loop and spikingjelly run the same NCHW convs: identical)
    ref = fns["snnc_exact_convs"]().detach()
    agree = {name: round(float((fn().detach() == ref).float().mean()), 6) for name, fn in fns.items()}
    rates = [round(r, 4) for r in firing_rates(unrolled, x)]   # per LIF layer, in graph order
    repeats = 3 if quick else 7
    # warm-up inside (allocator, oneDNN primitives, native build), then interleaved rounds
    med = interleaved_seconds(fns, repeats)
    os.environ.pop("SNNC_NATIVE", None)
    for name in fns:
        if name == "snnc":
            continue
        emit(bench="training", case="speed", net="bench_net 3->64->128->128 32x32", T=T, N=N,
             threads=torch.get_num_threads(),
             snnc="retrain default: int8 spike convs, native scan, saved_state=auto",
             peer=name, snnc_step_s=round(med["snnc"], 3), peer_step_s=round(med[name], 3),
             speedup=round(med[name] / med["snnc"], 2), snnc_ratio_vs_peer=round(med["snnc"] / med[name], 3),
             allocator="reuse_freed_memory", snnc_spike_agreement=agree["snnc"], peer_spike_agreement=agree[name],
             firing_rates=rates, repeats=repeats)


class _AtanSpike(torch.autograd.Function):
    """Heaviside forward, atan surrogate backward (alpha=2), as a plain-torch user writes it."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return (z >= 0).float()

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad / (1 + (torch.pi * z) ** 2)


def _plain_loop_step(convs):
    """The bench net as a ~15-line multi-step loop (convs on T*N, LIF over T), one training step."""
    def run(x):
        T, N = x.shape[:2]
        for conv in convs:
            y = conv(x.flatten(0, 1)).unflatten(0, (T, N))
            v, out = torch.zeros_like(y[0]), []
            for t in range(T):
                v = 0.5 * v + y[t]
                s = _AtanSpike.apply(v - 1.0)
                v = v - s
                out.append(s)
            x = torch.stack(out)
        return x
    return run


# snnc's training-step variants: (saved membrane, conv mode), as in retrain(saved_state, convs);
# "snnc" is retrain's default, "snnc_saved_z" the default before saved_state="auto" (z kept in float32)
SNNC_MODES = {"snnc": ("auto", "int8"), "snnc_saved_z": ("float32", "int8"), "snnc_recompute": ("recompute", "int8"),
              "snnc_float16_state": ("float16", "int8"), "snnc_float32_convs": ("auto", "float32"),
              "snnc_exact_convs": ("auto", "exact")}


def _training_step(impl, T, N):
    """``(step, params)`` of one implementation of the bench net's training step."""
    net = _firing_bench_net()
    convs = [m for m in net if isinstance(m, nn.Conv2d)]
    if impl in SNNC_MODES:
        from snnc.training import scan_state, spike_convs
        g = insert_surrogate(unroll_timesteps(snnc.trace(net, torch.zeros(N, 3, 32, 32)), T=T), kind="atan").train()
        dtype, convs = SNNC_MODES[impl]

        def run_snnc(x):
            with scan_state(dtype), spike_convs(convs):
                return g(x)
        return run_snnc, g.parameters
    if impl == "spikingjelly":
        from spikingjelly.activation_based import functional
        sj = _spikingjelly_net(convs)

        def run_sj(x):
            functional.reset_net(sj)
            return sj(x)
        return run_sj, sj.parameters
    if impl == "plain_loop_torch_compile":
        return torch.compile(_plain_loop_step(nn.ModuleList(convs))), net.parameters
    raise ValueError(impl)


def _memory_child(impl, T, N):
    """Peak RSS rise (MiB) over one training step after a warm-up, and the step time."""
    import gc
    step, params = _training_step(impl, T, N)
    x = torch.rand(T, N, 3, 32, 32) * 2

    def one():
        for p in params():
            p.grad = None
        step(x).sum().backward()
    one()
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    status = lambda key: int(next(line.split()[1] for line in Path("/proc/self/status").read_text().splitlines()  # noqa: E731
                                  if line.startswith(key + ":")))
    base = status("VmRSS")
    t0 = time.perf_counter()
    one()
    seconds = time.perf_counter() - t0
    print(json.dumps({"peak_mb": round((status("VmHWM") - base) / 1024, 1), "step_s": round(seconds, 3)}))


def bench_memory(quick, N=16):
    """Peak memory of one training step at T=8 and T=32: snnc vs spikingjelly vs torch.compile of a
    plain loop, each in a fresh process (MALLOC_MMAP_THRESHOLD_=16384 there, so RSS follows live
    tensors; VmHWM reset through /proc/self/clear_refs)."""
    import subprocess
    if not Path("/proc/self/clear_refs").exists():
        emit(bench="training", case="memory", skipped="needs Linux /proc")
        return
    N = 4 if quick else N
    for T in (8, 32):
        rows = {}
        for impl in (*SNNC_MODES, "spikingjelly", "plain_loop_torch_compile"):
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="16384")
            cmd = [sys.executable, __file__, "--memory-child", impl, str(T), str(N)]
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
                rows[impl] = json.loads(r.stdout.strip().splitlines()[-1])
            except (subprocess.TimeoutExpired, IndexError, json.JSONDecodeError) as e:
                emit(bench="training", case="memory", T=T, impl=impl, error=type(e).__name__)
        sj = rows.get("spikingjelly", {}).get("peak_mb")
        tc = rows.get("plain_loop_torch_compile", {}).get("peak_mb")
        for impl, row in rows.items():
            emit(bench="training", case="memory", net="bench_net 3->64->128->128 32x32", T=T, N=N, impl=impl,
                 saved_state=SNNC_MODES.get(impl, (None,))[0], **row,
                 peak_ratio_vs_spikingjelly=round(row["peak_mb"] / sj, 3) if sj else None,
                 peak_ratio_vs_torch_compile=round(row["peak_mb"] / tc, 3) if tc else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs and repeats")
    ap.add_argument("--only", choices=("accuracy", "tdbn", "speed", "memory"))
    ap.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)  # IMPL T N, run by bench_memory
    args = ap.parse_args(argv)
    if args.memory_child:
        impl, T, N = args.memory_child
        return _memory_child(impl, int(T), int(N))
    threads = torch.get_num_threads()
    for name, fn in (("accuracy", bench_accuracy), ("tdbn", bench_tdbn), ("speed", bench_speed),
                     ("memory", bench_memory)):
        if args.only in (None, name):
            # the digits nets have tiny tensors: one thread avoids thread-pool sync on a shared CPU
            torch.set_num_threads(threads if name == "speed" else 1)
            fn(args.quick)


if __name__ == "__main__":
    main()
