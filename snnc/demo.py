"""``make demo``: the main job on the embedded digits data.

Each stage prints one readable block; stages run in order and share a ``state`` dict
(data, trained ANN, graphs). A stage that needs a target which is not available says so and
the demo goes on.
"""
from __future__ import annotations

import time

import torch
from torch import nn

import snnc
from snnc.data import digits
from snnc.zoo import digits_cnn


def accuracy(fn, x, y, batch=256) -> float:
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (fn(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item()
    return 100.0 * correct / len(x)


def train_ann(model, data, epochs=15, lr=3e-3, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    train, _ = data.loaders(batch_size=64, seed=seed)
    model.train()
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    return model.eval()


def stage_ann(state):
    data = state["data"] = digits()
    t0 = time.perf_counter()
    torch.manual_seed(0)
    ann = state["ann"] = train_ann(digits_cnn(16), data)
    acc = accuracy(ann, data.x_test, data.y_test)
    state["ann_acc"] = acc
    print(f"[ann]   digits CNN trained in {time.perf_counter() - t0:.1f}s: test accuracy {acc:.2f}% "
          f"({len(data.x_train)} train / {len(data.x_test)} test images)")


def stage_trace(state):
    g = state["graph"] = snnc.trace(state["ann"], state["data"].x_test[:1])
    print("[trace] spiking IR of the ANN:")
    print(snnc.dump(g))


def stage_torch_target(state):
    data = state["data"]
    m = snnc.compile(state["graph"], target="torch")
    t0 = time.perf_counter()
    acc = accuracy(m, data.x_test, data.y_test)
    ms = 1e3 * (time.perf_counter() - t0)
    print(f"[torch] target torch: accuracy {acc:.2f}%, {ms:.1f} ms for the test set")


def stage_integer(state):
    """Neuromorphic-style integer target: convert, quantize to int8 weights / 24-bit membranes,
    compare with the float SNN, then compile the integer IR to C with TVM (bit-exact check)."""
    from snnc.passes import fold_bn, quantize_integer, threshold_balance, unroll_timesteps
    from snnc.passes.quantize_integer import quantize_input
    data, T = state["data"], 16
    g = threshold_balance(fold_bn(snnc.trace(state["ann"], data.x_test[:1])), data.x_train[:512])
    snn = unroll_timesteps(g, T)
    q = quantize_integer(snn, weight_bits=8)
    xq = quantize_input(q, data.x_test)
    float_acc = accuracy(lambda x: snnc.run(snn, x), data.x_test, data.y_test)
    ref = snnc.run(q, xq)
    int_acc = 100.0 * (ref.argmax(-1) == data.y_test).float().mean().item()
    print(f"[int]   T={T}: float SNN {float_acc:.2f}% -> int8 weights, int32 currents, 24-bit membranes "
          f"{int_acc:.2f}%")
    try:
        t0 = time.perf_counter()
        m = snnc.compile(q, target="tvm:int", codegen="c")
        same = torch.equal(m(xq), ref)
        print(f"[int]   tvm:int C source: {len(m.c_source.splitlines())} lines, built in "
              f"{time.perf_counter() - t0:.1f}s; outputs bit-exact vs the integer reference: {same}")
    except ImportError as e:
        print(f"[int]   tvm:int skipped (TVM not available: {e})")


STAGES = [stage_ann, stage_trace, stage_torch_target, stage_integer]


def main():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    state = {}
    for stage in STAGES:
        stage(state)


if __name__ == "__main__":
    main()
