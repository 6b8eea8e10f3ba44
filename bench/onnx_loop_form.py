"""Which form of the neuron loop over T onnxruntime runs faster: unrolled or ONNX ``Scan``.

    .venv/bin/python bench/onnx_loop_form.py [--quick]

Builds one LIF layer (decay 0.5, v_th 1, subtract reset, the update of ``snnc.ops.LIF``) over a
``[T, M]`` input both ways with ``onnx.helper`` — T unrolled copies of the step, and a ``Scan``
whose body is one step with the membrane as loop state — checks both give the same spikes, and
prints one JSON line per shape: median ms of each (interleaved rounds) and
``ratio_scan_vs_unrolled``. The onnx target keeps the unrolled form that torch.onnx produces
(targets/onnx.py) because this ratio stays near 1.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto
from onnx import helper as h


def _const(name, value, dtype=TensorProto.FLOAT):
    return h.make_node("Constant", [], [name], value=h.make_tensor(name + "_value", dtype, [], [value]))


def _lif_step(x, v, v_out, s, p):
    """H = decay * V + X;  S = (H >= v_th);  V' = H - v_th * S."""
    return [h.make_node("Mul", [v, "decay"], [p + "dv"]), h.make_node("Add", [p + "dv", x], [p + "h"]),
            h.make_node("GreaterOrEqual", [p + "h", "v_th"], [p + "b"]),
            h.make_node("Cast", [p + "b"], [s], to=TensorProto.FLOAT),
            h.make_node("Mul", [s, "v_th"], [p + "sv"]), h.make_node("Sub", [p + "h", p + "sv"], [v_out])]


def _model(nodes, T, M):
    io = [h.make_tensor_value_info(n, TensorProto.FLOAT, [T, M]) for n in ("X", "S")]
    model = h.make_model(h.make_graph(nodes, "lif", [io[0]], [io[1]]), opset_imports=[h.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model


def unrolled(T, M):
    nodes = [_const("decay", 0.5), _const("v_th", 1.0), _const("zero", 0.0),
             h.make_node("Split", ["X"], [f"x{t}" for t in range(T)], axis=0, num_outputs=T),
             h.make_node("Mul", ["x0", "zero"], ["v_init"])]
    v = "v_init"
    for t in range(T):
        nodes += _lif_step(f"x{t}", v, f"v{t}", f"s{t}", f"t{t}_")
        v = f"v{t}"
    nodes.append(h.make_node("Concat", [f"s{t}" for t in range(T)], ["S"], axis=0))
    return _model(nodes, T, M)


def scan(T, M):
    body = h.make_graph([_const("decay", 0.5), _const("v_th", 1.0)] + _lif_step("xt", "v_in", "v_out", "st", "b_"),
                        "step", [h.make_tensor_value_info(n, TensorProto.FLOAT, [M]) for n in ("v_in", "xt")],
                        [h.make_tensor_value_info(n, TensorProto.FLOAT, [M]) for n in ("v_out", "st")])
    nodes = [_const("zero", 0.0), _const("i0", 0, TensorProto.INT64),
             h.make_node("Gather", ["X", "i0"], ["x0"], axis=0), h.make_node("Mul", ["x0", "zero"], ["v_init"]),
             h.make_node("Scan", ["v_init", "X"], ["v_last", "S"], num_scan_inputs=1, body=body)]
    return _model(nodes, T, M)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    shapes = [(4, 1024), (8, 65536)] if args.quick else [(4, 1024), (16, 1024), (8, 65536), (4, 2 ** 21)]
    rounds = 5 if args.quick else 11
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = args.threads
    for T, M in shapes:
        sessions = {k: ort.InferenceSession(f(T, M).SerializeToString(), opts, providers=["CPUExecutionProvider"])
                    for k, f in (("unrolled", unrolled), ("scan", scan))}
        x = (np.random.default_rng(0).random((T, M)) * 2).astype(np.float32)
        outs = {k: s.run(None, {"X": x})[0] for k, s in sessions.items()}
        times = {k: [] for k in sessions}
        for _ in range(rounds):
            for k, s in sessions.items():
                t0 = time.perf_counter()
                s.run(None, {"X": x})
                times[k].append(time.perf_counter() - t0)
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        print(json.dumps({"bench": "onnx_loop_form", "T": T, "M": M, "unrolled_ms": round(ms["unrolled"], 4),
                          "scan_ms": round(ms["scan"], 4), "ratio_scan_vs_unrolled": round(ms["scan"] / ms["unrolled"], 3),
                          "same_spikes": bool(np.array_equal(outs["unrolled"], outs["scan"])),
                          "rounds": rounds, "threads": args.threads}))


if __name__ == "__main__":
    main()
