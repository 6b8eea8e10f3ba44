"""ANN -> SNN conversion accuracy vs time steps on digits: snnc's methods against spikingjelly 2.0's
``ann2snn`` recipes on the same trained ANN, in the same run; plus low-latency (QCFS) conversion
and hybrid STDB fine-tuning (Rathi 2020).

    .venv/bin/python bench/conversion.py [--quick] [--plot PATH] [--no-peer]

Prints one JSON line per result:
  {"kind": "ann", "net": ..., "acc": ...}
  {"kind": "snn", "net": ..., "lib": "snnc"|"spikingjelly", "method": ..., "T": ..., "acc": ...}
  {"kind": "hybrid", "net": ..., "T": ..., "epoch": ..., "acc": ...}
  {"kind": "check", "name": ..., ...}   (the issue's targets, with ratios snnc / spikingjelly)
and saves a plot of accuracy vs T (default bench/out/conversion.png).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

import snnc
from snnc.data import digits
from snnc.demo import accuracy, train_ann
from snnc.errors import SnncError
from snnc.ops import use_qcfs
from snnc.passes import fold_bn, insert_surrogate, threshold_balance, unroll_timesteps
from snnc.zoo import digits_cnn
from snnc.zoo.digits_resnet import digits_resnet

SNNC_METHODS = {   # name -> threshold_balance options (mse: tuned per T, see below)
    "max": dict(method="max"),
    "p99.9": dict(method="percentile", q=99.9),
    "p99.9-cw": dict(method="percentile", q=99.9, channel_wise=True),
    "p99.9-cw-half": dict(method="percentile", q=99.9, channel_wise=True, v_init_fraction=0.5),
    "spiking-rathi": dict(method="spiking", encoding="poisson", scale=0.7, T_calib=32),
    "mse@T": dict(method="mse"),
    "mse@T-cw": dict(method="mse", channel_wise=True),
    "mse@T-bc": dict(method="mse", bias_correction=True),
    "mse@T-cw-bc": dict(method="mse", channel_wise=True, bias_correction=True),
}
SLOW_METHODS = ("spiking-rathi",)   # layer-by-layer SNN runs: measured on the CNN only

# hybrid fine-tuning runs: (surrogate, T, Adam lr, epochs). STDB diverged at lr 1e-3 in trials.
HYBRID = (("triangle", 4, 1e-3, 5), ("triangle", 8, 1e-3, 3), ("stdb", 4, 1e-4, 3))
HYBRID_QUICK = (("triangle", 4, 1e-3, 1),)


def emit(**row):
    print(json.dumps(row), flush=True)


def curve(step_fn, reset_fn, x, y, Ts, running_mean=False):
    """Accuracy after each T in Ts from one run of max(Ts) steps: the sum of the per-step outputs
    (spikingjelly), or the output itself when it already is the mean so far (snnc's readout)."""
    reset_fn()
    acc, total = {}, None
    with torch.no_grad():
        for t in range(1, max(Ts) + 1):
            out = step_fn(x)
            total = out if total is None or running_mean else total + out
            if t in Ts:
                acc[t] = 100.0 * (total.argmax(-1) == y).float().mean().item()
    reset_fn()
    return acc


def snnc_curves(net, ann, data, calib, Ts, results):
    folded = fold_bn(snnc.trace(ann, data.x_test[:1]))
    for name, opts in SNNC_METHODS.items():
        if name in SLOW_METHODS and net != "cnn":
            continue
        t0 = time.perf_counter()
        try:
            if name.startswith("mse@T"):   # scales tuned for each T: one conversion per T
                acc = {}
                for T in Ts:
                    g = threshold_balance(folded, calib, T_target=T, **opts)
                    acc[T] = accuracy(lambda x: snnc.run(unroll_timesteps(g, T), x), data.x_test, data.y_test)
            else:
                g = threshold_balance(folded, calib, **opts)
                acc = curve(g, lambda: snnc.reset(g), data.x_test, data.y_test, Ts, running_mean=True)
        except SnncError as e:
            emit(kind="skip", net=net, lib="snnc", method=name, reason=str(e)[:200])
            continue
        for T in Ts:
            emit(kind="snn", net=net, lib="snnc", method=name, T=T, acc=round(acc[T], 2),
                 seconds=round(time.perf_counter() - t0, 1))
            results[(net, "snnc", name, T)] = acc[T]


def sj_curves(net, ann, data, Ts, results):
    try:
        from spikingjelly.activation_based import ann2snn, functional
    except ImportError as e:
        emit(kind="skip", net=net, lib="spikingjelly", reason=f"not installed: {e}")
        return
    calib = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=128)
    recipes = {
        "max": lambda: ann2snn.RateCodingRecipe(dataloader=calib, mode="max"),
        "99.9%": lambda: ann2snn.RateCodingRecipe(dataloader=calib, mode="99.9%"),
        "99.9%-cw-half": lambda: ann2snn.RateCodingRecipe(dataloader=calib, mode="99.9%", channel_wise=True,
                                                          half_threshold=True),
        "ltb": lambda: ann2snn.LocalThresholdBalancingRecipe(dataloader=calib),
    }
    for name, recipe in recipes.items():
        t0 = time.perf_counter()
        try:
            snn = ann2snn.FXConverter(recipe=recipe(), device="cpu").convert(copy.deepcopy(ann))
            acc = curve(snn, lambda: functional.reset_net(snn), data.x_test, data.y_test, Ts)
        except Exception as e:  # a peer's failure is a result to report, not a crash of the bench
            emit(kind="skip", net=net, lib="spikingjelly", method=name, reason=f"{type(e).__name__}: {e}"[:200])
            continue
        for T in Ts:
            emit(kind="snn", net=net, lib="spikingjelly", method=name, T=T, acc=round(acc[T], 2),
                 seconds=round(time.perf_counter() - t0, 1))
            results[(net, "spikingjelly", name, T)] = acc[T]


def qcfs_curve(data, calib, Ts, epochs, results):
    """Bu 2022: train the ANN with QCFS (L=4) activations, convert with trained thresholds, v0=Vth/2."""
    torch.manual_seed(0)
    ann = train_ann(use_qcfs(digits_cnn(16), L=4, threshold=4.0), data, epochs=epochs)
    acc_ann = accuracy(ann, data.x_test, data.y_test)
    emit(kind="ann", net="cnn-qcfs", acc=round(acc_ann, 2))
    g = threshold_balance(fold_bn(snnc.trace(ann, data.x_test[:1])), method="qcfs")
    acc = curve(g, lambda: snnc.reset(g), data.x_test, data.y_test, Ts, running_mean=True)
    for T in Ts:
        emit(kind="snn", net="cnn-qcfs", lib="snnc", method="qcfs(L=4)", T=T, acc=round(acc[T], 2))
        results[("cnn-qcfs", "snnc", "qcfs(L=4)", T)] = acc[T]
    return acc_ann


def hybrid(net, ann, data, calib, T, epochs, lr, kind):
    """Rathi 2020: convert (percentile, layer-wise), unroll, surrogate ``kind`` (``stdb`` or the
    linear ``triangle``), train a few epochs with Adam."""
    g = snnc.convert(ann, calib, T=T, method="percentile")
    start = accuracy(lambda x: snnc.run(g, x), data.x_test, data.y_test)
    emit(kind="hybrid", net=net, T=T, epoch=0, acc=round(start, 2), surrogate=kind, lr=lr)
    g = insert_surrogate(g, kind)
    train, test = data.loaders(batch_size=64, seed=0)
    torch.manual_seed(0)
    hist = snnc.retrain(g, train, epochs=epochs, lr=lr, val_loader=test)
    for row in hist:
        emit(kind="hybrid", net=net, T=T, epoch=row["epoch"], acc=round(row["val_acc"], 2), surrogate=kind,
             lr=lr, seconds=round(row["seconds"], 1))
    return hist[-1]["val_acc"]


def checks(results, ann_acc, hybrid_acc, Ts):
    if ("cnn", "snnc", "p99.9", 32) in results:
        a = results[("cnn", "snnc", "p99.9", 32)]
        emit(kind="check", name="cnn_percentile_T32_within_1pt_of_ann", ann=round(ann_acc["cnn"], 2),
             snn=round(a, 2), gap=round(ann_acc["cnn"] - a, 2), ok=ann_acc["cnn"] - a <= 1.0)
    for net in ann_acc:
        for T in (4, 8):
            best = {}
            for lib in ("snnc", "spikingjelly"):
                cands = {m: v for (n, lb, m, t), v in results.items() if n == net and lb == lib and t == T}
                if cands:
                    best[lib] = max(cands.items(), key=lambda kv: kv[1])
            if len(best) == 2:
                (ms, s), (mj, j) = best["snnc"], best["spikingjelly"]
                emit(kind="check", name=f"{net}_T{T}_best_snnc_vs_best_spikingjelly", snnc=round(s, 2),
                     snnc_method=ms, spikingjelly=round(j, 2), spikingjelly_method=mj,
                     ratio=round(s / max(j, 1e-9), 4), ok=round(s, 2) > round(j, 2))   # a tie is not a win
    for (net, T, kind), acc in hybrid_acc.items():
        emit(kind="check", name=f"{net}_hybrid_{kind}_T{T}_within_2pt_of_ann", ann=round(ann_acc[net], 2),
             snn=round(acc, 2), ok=ann_acc[net] - acc <= 2.0)


def plot(results, ann_acc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nets = sorted({k[0] for k in results}, key=lambda n: ("qcfs" in n, n))
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4.5), squeeze=False)
    for ax, net in zip(axes[0], nets):
        series = sorted({(k[1], k[2]) for k in results if k[0] == net})
        for lib, method in series:
            pts = sorted((k[3], v) for k, v in results.items() if k[:3] == (net, lib, method))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-o" if lib == "snnc" else "--s", ms=3,
                    label=f"{lib}: {method}")
        if net in ann_acc:
            ax.axhline(ann_acc[net], color="k", lw=0.8, ls=":", label="ANN")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("time steps T")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 101)
        ax.set_title(f"digits {net}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    emit(kind="plot", path=path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer T values, epochs and nets")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "out", "conversion.png"))
    ap.add_argument("--no-peer", action="store_true", help="skip spikingjelly")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    Ts = (2, 4, 8, 32) if args.quick else (2, 4, 8, 16, 32, 64)
    epochs = 8 if args.quick else 15
    data = digits()
    calib = data.x_train[:512]
    results, ann_acc, hybrid_acc = {}, {}, {}
    nets = {"cnn": lambda: digits_cnn(16)}
    if not args.quick:
        nets["resnet"] = lambda: digits_resnet(16)
    for net, make in nets.items():
        torch.manual_seed(0)
        t0 = time.perf_counter()
        ann = train_ann(make(), data, epochs=epochs)
        ann_acc[net] = accuracy(ann, data.x_test, data.y_test)
        emit(kind="ann", net=net, acc=round(ann_acc[net], 2), train_seconds=round(time.perf_counter() - t0, 1))
        snnc_curves(net, ann, data, calib, Ts, results)
        if not args.no_peer:
            sj_curves(net, ann, data, Ts, results)
        if net == "cnn":
            runs = HYBRID_QUICK if args.quick else HYBRID
            for kind, T, lr, n_epochs in runs:
                hybrid_acc[(net, T, kind)] = hybrid(net, ann, data, calib, T, n_epochs, lr, kind)
    ann_acc["cnn-qcfs"] = qcfs_curve(data, calib, Ts, epochs, results)
    checks(results, ann_acc, hybrid_acc, Ts)
    plot(results, ann_acc, args.plot)


if __name__ == "__main__":
    sys.exit(main())
