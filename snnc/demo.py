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
    paper_cnn = Path("/work/shared/data/nir-paper/cnn_sinabs.nir")
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


def stage_ecosystem(state):
    """NIR in and out, a spikingjelly model imported side by side, and an activity/energy report."""
    import tempfile
    from pathlib import Path

    from snnc.ops import IF, LIF, DirectEncoder
    paper = Path("/work/shared/data/nir-paper")
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
        snn, what = state["snn"], "the converted digits CNN (T=8)"
    else:
        snn, what = g, "the small untrained SNN (T=8)"
    stats = collect(snn, TensorDataset(data.x_test, data.y_test), T=8)
    print(f"[report] activity and energy of {what}, per test sample:")
    print("\n".join("         " + line for line in table(stats).splitlines() if line))


STAGES = [stage_ann, stage_trace, stage_torch_target, stage_convert, stage_ecosystem, stage_data]


def main():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    state = {}
    for stage in STAGES:
        stage(state)


if __name__ == "__main__":
    main()
