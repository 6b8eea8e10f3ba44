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
    """ANN -> SNN (fold_bn, threshold_balance, unroll): accuracy at a few T, two methods."""
    data, ann = state["data"], state["ann"]
    calib = data.x_train[:256]
    t0 = time.perf_counter()
    rows = []
    for method, opts in (("percentile", {}), ("mse", {"channel_wise": True})):
        accs = []
        for T in (4, 8, 32):
            g = snnc.convert(ann, calib, T=T, method=method, **opts)
            accs.append(accuracy(lambda x: snnc.run(g, x), data.x_test, data.y_test))
        rows.append(f"{method:>10}: " + "  ".join(f"T={T}: {a:.2f}%" for T, a in zip((4, 8, 32), accs)))
    state["snn"] = snnc.convert(ann, calib, T=8, method="mse", channel_wise=True)
    print(f"[convert] ANN {state['ann_acc']:.2f}% -> SNN (IF neurons, membrane readout), "
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



STAGES = [stage_ann, stage_trace, stage_torch_target, stage_convert, stage_data]


def main():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    state = {}
    for stage in STAGES:
        stage(state)


if __name__ == "__main__":
    main()
