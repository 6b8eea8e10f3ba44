"""``make demo``: the main job on the embedded digits data.

ANN training -> ANN-to-SNN conversion -> every target (torch, onnx, tvm:llvm, tvm:int) with
accuracy and timings -> direct SNN training -> NIR / framework import / activity report ->
event data from a folder. Stages run in order and share a ``state`` dict; a stage whose optional
dependency is missing says so and the demo goes on.
"""
from __future__ import annotations

import time

import torch
from torch import nn

import snnc
from snnc.data import nir_paper_dir
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


def stage_convert(state):
    """ANN -> SNN (fold_bn, threshold_balance, unroll): accuracy at a few T for two methods."""
    data, ann = state["data"], state["ann"]
    calib = data.x_train[:256]
    t0 = time.perf_counter()
    per_step = snnc.convert(ann, calib, method="percentile")     # per-step graph: run it for any T
    rows = ["percentile (Rueckauer 2017): " + "  ".join(
        f"T={T}: {accuracy(lambda x: snnc.run(per_step, x, T=T), data.x_test, data.y_test):.2f}%" for T in (4, 8, 32))]
    g = state["snn"] = snnc.convert(ann, calib, T=4, method="mse", channel_wise=True)
    rows.append(f"mse + half threshold, tuned for T=4 (low latency): "
                f"T=4: {accuracy(lambda x: snnc.run(g, x), data.x_test, data.y_test):.2f}%")
    print(f"[convert] ANN {state['ann_acc']:.2f}% -> SNN (IF neurons, membrane readout) in "
          f"{time.perf_counter() - t0:.1f}s:")
    for row in rows:
        print("          " + row)
    print("[ir]    the converted, unrolled SNN (snnc.dump):")
    print("".join("        " + line + "\n" for line in snnc.dump(g).splitlines()), end="")


def stage_targets(state):
    """The converted SNN on every float target: accuracy, latency for the test set, agreement."""
    import tempfile
    from pathlib import Path

    from snnc.differential import differential
    data, g = state["data"], state["snn"]
    print(f"[targets] the converted SNN (T={g.snnc_spec['T']}) compiled for each target, 450 test images:")
    for target in ("torch", "onnx", "tvm:llvm"):
        try:
            t0 = time.perf_counter()
            m = snnc.compile(g, target=target)
            compile_s = time.perf_counter() - t0
        except (ImportError, snnc.SnncError) as e:
            print(f"          {target:9s} skipped: {e}")
            continue
        accuracy(m, data.x_test[:64], data.y_test[:64])  # warm-up (allocations, thread pools)
        t0 = time.perf_counter()
        acc = accuracy(m, data.x_test, data.y_test)
        ms = 1e3 * (time.perf_counter() - t0)
        with tempfile.TemporaryDirectory() as tmp:   # the exported artefact runs without the model
            suffix = {"torch": ".pt", "onnx": ".onnx", "tvm:llvm": ".so"}[target]
            reloaded = snnc.load(m.export(Path(tmp) / f"net{suffix}"))
            xb = data.x_test[:g.snnc_spec["inputs"][0][0][0]]  # tvm's exported library has fixed shapes
            diff = (reloaded(xb) - m(xb)).abs().max().item()
        print(f"          {target:9s} accuracy {acc:.2f}%  {ms:7.1f} ms  (compile {compile_s:.1f}s, "
              f"exported + reloaded: max |diff| {diff:.1e})")
    report = differential(g, data.x_test[:32])
    print("          differential check vs the reference interpreter: " + ", ".join(
        f"{t} {r.status}" for t, r in report.targets.items()))


def stage_integer(state):
    """Neuromorphic-style integer target: convert, quantize to int8 weights / 24-bit membranes,
    compare with the float SNN, then compile the integer IR to C with TVM (bit-exact check)."""
    from snnc.passes import quantize_integer
    from snnc.passes.quantize_integer import quantize_input
    data = state["data"]
    snn = state["snn"]
    T = snn.snnc_spec["T"]
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


def stage_direct_training(state):
    """Direct SNN training (STBP, Wu 2019): unroll T=4, surrogate gradients, a plain Adam loop."""
    from snnc.data import loader
    from snnc.passes import insert_surrogate, unroll_timesteps
    from snnc.zoo import digits_snn
    data = state.get("data") or digits()
    torch.manual_seed(0)
    g = unroll_timesteps(snnc.trace(digits_snn(8), data.x_test[:2]), T=4)
    g = insert_surrogate(g, kind="atan")
    lif = next(line for line in snnc.dump(g).splitlines() if "snn.lif" in line)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # tiny tensors: one thread is faster on a shared CPU
    try:
        hist = snnc.retrain(g, loader(data.x_train, data.y_train, 64, shuffle=True), epochs=4, lr=3e-3,
                            val_loader=loader(data.x_test, data.y_test, 256), progress=False)
    finally:
        torch.set_num_threads(threads)
    state["direct_snn"] = g
    secs = sum(h["seconds"] for h in hist)
    print(f"[train] direct SNN training at T=4 (atan surrogate), neuron IR:\n  {lif.strip()}")
    print("        test accuracy per epoch: " + ", ".join(f"{h['val_acc']:.1f}%" for h in hist) + f" ({secs:.1f}s)")


def stage_ecosystem(state):
    """NIR in and out, a spikingjelly model imported side by side, and an activity/energy report."""
    import tempfile
    from pathlib import Path

    from snnc.ops import IF, LIF, DirectEncoder
    paper = nir_paper_dir()
    try:
        import nir  # noqa: F401
    except ImportError:
        print("[nir]   NIR needs the nir package (pip install nir): skipped")
        return
    if (paper / "lif_norse.nir").exists():
        g = snnc.from_nir(paper / "lif_norse.nir", dt=1e-4)
        x = torch.zeros(1000, 1, 1)
        pattern = ("0000001000 0000000000 0010000100 0110010100 1101111111 1111000000 0000000111 1111111110 "
                   "0000110000 0000000000").replace(" ", "")  # entry i at step 10*i (the paper's README)
        for i, c in enumerate(pattern):
            x[10 * i, 0, 0] = float(c)
        steps = torch.nonzero(snnc.run(g, x, T=1000)[:, 0, 0]).flatten().tolist()
        print(f"[nir]   norse's LIF graph (NIR paper task 1, dt=1e-4): spikes at steps {steps} "
              "(norse: [460, 510, 710, 760])")
    torch.manual_seed(0)
    net = nn.Sequential(DirectEncoder(), nn.Conv2d(1, 4, 3, padding=1), LIF(tau=2.0, v_th=0.5), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(64, 10), IF(v_th=0.5))
    g = snnc.trace(net, state["data"].x_test[:1])
    with tempfile.TemporaryDirectory() as tmp, __import__("warnings").catch_warnings():
        __import__("warnings").simplefilter("ignore")
        snnc.to_nir(g, path=Path(tmp) / "net.nir")
        back = snnc.from_nir(Path(tmp) / "net.nir")
    x = state["data"].x_test[:64] * 2
    same = torch.equal(snnc.run(g, x, T=8), snnc.run(back, x, T=8))
    print(f"[nir]   snnc -> NIR file -> snnc: outputs identical: {same}")
    try:
        from spikingjelly.activation_based import functional, neuron
    except ImportError:
        print("[import] spikingjelly not installed: framework import skipped")
    else:
        sj = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), neuron.LIFNode(tau=2.0), nn.Linear(32, 10),
                           neuron.IFNode(v_reset=None)).eval()
        functional.reset_net(sj)
        with torch.no_grad():
            ref = torch.stack([sj(x) for _ in range(8)])
        ours = snnc.run(snnc.trace(sj, x[:1]), x, T=8)
        print(f"[import] spikingjelly LIFNode/IFNode model traced into snnc: spikes identical {torch.equal(ref, ours)} "
              f"({int(ref.sum())} spikes)")
    from torch.utils.data import TensorDataset

    from snnc.report import collect, table
    data = state["data"]
    if "snn" in state:  # from stage_convert
        snn, what = state["snn"], "the converted digits CNN"
    else:
        snn, what = g, "the small untrained SNN (T=8)"
    stats = collect(snn, TensorDataset(data.x_test, data.y_test), T=8)
    print(f"[report] activity and energy of {what}, per test sample:")
    print("\n".join("         " + line for line in table(stats).splitlines() if line))


def stage_data(state):
    """Event data from a folder in N-MNIST's published layout (written here, synthetic), framed
    like tonic's ToFrame and run through the NIR paper's N-MNIST CNN (or a small SNN)."""
    import importlib.util
    import tempfile
    from pathlib import Path

    from snnc.data import dataset, dataset_loader
    from snnc.data.writers import write_nmnist
    if importlib.util.find_spec("tonic") is None:
        print("[data]  event data sets need tonic (pip install tonic): skipped")
        return
    paper_cnn = nir_paper_dir() / "cnn_sinabs.nir"
    with tempfile.TemporaryDirectory() as tmp:
        write_nmnist(Path(tmp), per_class=2, events=3000)
        ds = dataset("nmnist", tmp, "test", T=8)
        ds[0]   # tonic's import (~3 s) stays out of the rate
        t0 = time.perf_counter()
        seq, y = next(iter(dataset_loader(ds, batch_size=len(ds))))
        rate = len(ds) / (time.perf_counter() - t0)
    try:
        g, what = snnc.from_nir(paper_cnn), "NIR paper CNN (sinabs)"
    except snnc.SnncError:   # no nir package or no paper file: a small SNN of the same input shape
        from snnc.ops import IF, Readout
        net = nn.Sequential(nn.Conv2d(2, 8, 5, stride=2, padding=1), IF(), nn.Flatten(),
                            nn.Linear(8 * 16 * 16, 10), Readout("membrane"))
        g, what = snnc.trace(net, torch.zeros(1, 2, 34, 34)), "small SNN"
    out = snnc.run(g, seq, T=8)
    print(f"[data]  N-MNIST-format folder: {len(ds)} samples framed to {list(seq.shape)} (T, N, P, H, W) "
          f"at {rate:.0f} samples/s; {what} output {list(out.shape)}")


STAGES = [stage_ann, stage_convert, stage_targets, stage_integer, stage_direct_training, stage_ecosystem,
          stage_data]


def main():
    state = {}
    t0 = time.perf_counter()
    for stage in STAGES:
        stage(state)
    print(f"[done]  demo finished in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
