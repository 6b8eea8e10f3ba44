"""Integer target bench: digits accuracy of the float SNN vs its int8 and int4 integer IR (same T),
weight memory, synaptic operations (SOPs) per inference, and tvm:int's speed: its VNNI build (int8
conv/linear on ``vpdpbusd``, where this CPU has AVX-512 VNNI) and its portable build, both checked
bit-exact against the integer reference, timed against the float SNN in torch eager, torch.compile
and onnxruntime and against the integer reference, in interleaved rounds (medians), with the
firing rate of every neuron layer.

Two float SNNs: a converted CNN (digits_cnn -> fold_bn -> threshold_balance, T steps) and a
directly trained one (digits_snn, atan surrogate, retrain, T=4). One JSON line per result; the
peer of every integer number is the float SNN measured in the same run.

    .venv/bin/python bench/integer.py [--quick]

SOPs: accumulate events of a weighted layer = for every nonzero input value, one per synapse it
drives (a conv: the output positions and channels its kernel reaches; a linear: its fan-out),
summed over T, divided by the batch. This is the event-driven cost of Merolla 2014 / Davies 2018;
the ANN's dense MACs are given for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# bench/tvm.py would shadow the tvm package for scripts run from this folder
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import fx, nn  # noqa: E402

import snnc  # noqa: E402
from snnc.data import digits  # noqa: E402
from snnc.demo import accuracy, train_ann  # noqa: E402
from snnc.ops import IntConv2d, IntLinear  # noqa: E402
from snnc.passes import fold_bn, insert_surrogate, quantize_integer, threshold_balance, unroll_timesteps  # noqa: E402
from snnc.passes.quantize_integer import quantize_input  # noqa: E402
from snnc.report import firing_rates, interleaved_seconds  # noqa: E402
from snnc.zoo import digits_cnn, digits_snn  # noqa: E402


def weighted_layers(gm):
    return [m for m in gm.modules() if isinstance(m, (nn.Conv2d, nn.Linear, IntConv2d, IntLinear))]


def weight_bytes(gm, bits=None) -> int:
    """Weights at ``bits`` per value packed (``None``: float32), biases as int32/float32."""
    total = 0
    for m in weighted_layers(gm):
        w = m.weight.numel()
        total += w * 4 if bits is None else (w * bits + 7) // 8
        total += 0 if m.bias is None else m.bias.numel() * 4
    return total


def sops_per_inference(gm, x) -> float:
    """Accumulate events per sample (see the module docstring), from a reference run."""
    events = 0.0

    class _Count(fx.Interpreter):
        def call_module(self, target, args, kwargs):
            nonlocal events
            m = self.module.get_submodule(target)
            if isinstance(m, (nn.Conv2d, IntConv2d)):
                active = (args[0] != 0).float()
                k = m.weight.shape[2]
                ones = torch.ones(m.weight.shape[0], m.weight.shape[1], k, k)
                stride = m.stride if isinstance(m.stride, int) else m.stride[0]
                pad = m.padding if isinstance(m.padding, int) else m.padding[0]
                events += F.conv2d(active, ones, stride=stride, padding=pad).sum().item()
            elif isinstance(m, (nn.Linear, IntLinear)):
                events += (args[0] != 0).sum().item() * m.weight.shape[0]
            return super().call_module(target, args, kwargs)

    snnc.reset(gm)
    with torch.no_grad():
        _Count(gm).run(x)
    snnc.reset(gm)
    return events / len(x)


def float_peers(g, x) -> dict:
    """The float SNN run by torch eager, torch.compile and onnxruntime (those that work here)."""
    peers = {"float_torch_eager": lambda: snnc.run(g, x)}
    try:
        eager = snnc.compile(g, target="torch")
        compiled = torch.compile(eager.gm if hasattr(eager, "gm") else g)
        with torch.no_grad():
            compiled(x)
        peers["float_torch_compile"] = lambda: compiled(x)
    except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
        print(json.dumps({"bench": "integer", "peer": "float_torch_compile", "skipped": f"{type(e).__name__}: {e}"[:200]}))
    try:
        onnx = snnc.compile(g, target="onnx")
        peers["float_onnxruntime"] = lambda: onnx(x)
    except Exception as e:  # noqa: BLE001
        print(json.dumps({"bench": "integer", "peer": "float_onnxruntime", "skipped": f"{type(e).__name__}: {e}"[:200]}))
    return peers


def ann_macs(ann, x) -> float:
    macs = 0

    def hook(m, inp, out):
        nonlocal macs
        fan_in = m.weight[0].numel()
        macs += out.numel() // out.shape[0] * fan_in
    hs = [m.register_forward_hook(hook) for m in weighted_layers(ann)]
    with torch.no_grad():
        ann(x[:1])
    for h in hs:
        h.remove()
    return float(macs)


def converted_snn(data, T, epochs):
    torch.manual_seed(0)
    ann = train_ann(digits_cnn(16), data, epochs=epochs)
    g = threshold_balance(fold_bn(snnc.trace(ann, data.x_test[:1])), data.x_train[:512])
    return ann, unroll_timesteps(g, T)


def trained_snn(data, T, epochs):
    torch.manual_seed(0)
    g = insert_surrogate(unroll_timesteps(snnc.trace(digits_snn(8), data.x_test[:1]), T), "atan")
    snnc.retrain(g, data.loaders(batch_size=64)[0], epochs=epochs, lr=3e-3)
    return None, fold_bn(insert_surrogate(g, None))


def bench_model(name, ann, g, data, repeats, emit):
    x, y = data.x_test, data.y_test
    float_acc = accuracy(lambda b: snnc.run(g, b), x, y)
    float_bytes, float_sops = weight_bytes(g), sops_per_inference(g, x)
    base = {"bench": "integer", "model": name, "T": g.snnc_spec["T"]}
    row = {**base, "precision": "float32", "accuracy": float_acc, "weight_bytes": float_bytes,
           "sops_per_inference": float_sops}
    if ann is not None:
        row["ann_macs_per_inference"] = ann_macs(ann, x)
        row["sops_ratio_vs_ann_macs"] = float_sops / row["ann_macs_per_inference"]
    emit(row)
    for bits in (8, 4):
        q = quantize_integer(g, weight_bits=bits)
        xq = quantize_input(q, x)
        acc = accuracy(lambda b: snnc.run(q, b), xq, y)
        sops = sops_per_inference(q, xq)
        emit({**base, "precision": f"int{bits}", "accuracy": acc, "accuracy_delta_vs_float": acc - float_acc,
              "weight_bytes": weight_bytes(q, bits), "weight_bytes_ratio_vs_float": weight_bytes(q, bits) / float_bytes,
              "sops_per_inference": sops, "sops_ratio_vs_float_snn": sops / float_sops,
              "state_bits": q.snnc_integer["state_bits"], "leak": q.snnc_integer["leak"]})
        if bits == 8:
            bench_speed(base, g, q, x, xq, repeats, emit)


def bench_speed(base, g, q, x, xq, repeats, emit):
    """tvm:int (VNNI and portable builds) against the float SNN's peers and the integer reference."""
    ref = snnc.run(q, xq)
    rounded = lambda rates: [round(r, 4) for r in rates]  # noqa: E731
    emit({**base, "firing_rates_float": rounded(firing_rates(g, x)), "firing_rates_int8": rounded(firing_rates(q, xq))})
    builds = {}
    for isa in ("auto", "portable"):
        t0 = time.perf_counter()
        m = snnc.compile(q, target="tvm:int", isa=isa)
        name = f"tvm_int_{m.meta['int8_isa']}"
        builds[name] = m
        same = (m(xq) == ref).all(-1).float().mean().item() * 100
        emit({**base, "precision": "int8", "impl": name, "compile_s": round(time.perf_counter() - t0, 2),
              "bit_exact_samples_percent": same})
    fns = {k: (lambda m=m: m(xq)) for k, m in builds.items()}
    fns.update(float_peers(g, x))
    fns["int8_torch_reference"] = lambda: snnc.run(q, xq)
    with torch.no_grad():
        t = interleaved_seconds(fns, repeats)
    for k, v in t.items():
        row = {**base, "impl": k, "ms_test_set": round(v * 1e3, 2), "N": len(x)}
        for peer in ("float_torch_eager", "float_torch_compile", "float_onnxruntime", "int8_torch_reference"):
            if peer in t and k.startswith("tvm_int"):
                row[f"speedup_vs_{peer}"] = round(t[peer] / v, 3)
        emit(row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer epochs, T and repeats (a smoke run)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = digits()

    def emit(row):
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    repeats = 3 if args.quick else 7
    ann, g = converted_snn(data, T=8 if args.quick else 16, epochs=3 if args.quick else 15)
    bench_model("converted_digits_cnn", ann, g, data, repeats, emit)
    _, g = trained_snn(data, T=4, epochs=1 if args.quick else 4)
    bench_model("trained_digits_snn", None, g, data, repeats, emit)


if __name__ == "__main__":
    main()
