"""ANN -> SNN conversion accuracy vs time steps on digits: snnc's default (the recipe chosen per T
by measurement) and its named methods against spikingjelly 2.0's ``ann2snn`` converter recipes on
the same trained ANN, in the same run, for the digits CNN and the architectures people train
(a torchvision-style ResNet-18 with MaxPool/AdaptiveAvgPool and identity + projection skips, a
VGG with MaxPool); max-pool conversions compared (lateral / gate / per-step spikes / AvgPool +
fine-tune); QCFS training + conversion (Bu 2022); hybrid fine-tuning (surrogate, STDB Rathi 2020).

    .venv/bin/python bench/conversion.py [--quick] [--plot PATH] [--no-peer] [--nets cnn,resnet18,vgg]
    .venv/bin/python bench/conversion.py --seeds 5 --nets cnn     (the default vs spikingjelly over 5 ANNs)

Trained ANN weights are cached in .cache/bench-conversion/ (git-ignored), one file per net, epochs and
training seed.

``--seeds K`` (K > 1) trains K ANNs per net (seeds S..S+K-1, ``--seed-start S``, default 0: fresh
ANNs to confirm on what was chosen by looking at others; seed 0 is the single-seed run's ANN) and
runs only the issue's comparison on each: snnc's default and every spikingjelly recipe at T=2, 4, 8.
One ANN and 450 test images cannot tell the two apart (one image is 0.22 points), so it reports the
spread over ANNs and the paired difference (same ANN, same test images) with its standard error; see
bench/_seeds.py for the lines it adds.

Prints one JSON line per result:
  {"kind": "ann", "net": ..., "acc": ...}
  {"kind": "snn", "net": ..., "lib": "snnc"|"spikingjelly", "method": ..., "T": ..., "acc": ...}
  {"kind": "hybrid", "net": ..., "T": ..., "epoch": ..., "acc": ...}
  {"kind": "chosen", "net": ..., "T": ..., "method": ..., "convert_seconds": ..., "scores": {name: [agreement %,
   KL(ANN||SNN)]}, "readout_calibration": ...}   (what the default picked, and whether its readout was refitted)
  {"kind": "firing", "net": ..., "T": ..., "rates": {layer: rate}}    (default SNN, per IF layer)
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
from snnc.conversion import max_pool_to_avg_pool, train_qcfs
from snnc.data import digits
from snnc.demo import accuracy, train_ann
from snnc.errors import SnncError
from snnc.ops import IF
from snnc.passes import fold_bn, insert_surrogate, threshold_balance, unroll_timesteps
from snnc.zoo import digits_cnn
from snnc.zoo.digits_maxpool import digits_resnet18, digits_vgg

NETS = {"cnn": (lambda: digits_cnn(16), 15), "resnet18": (lambda: digits_resnet18(16), 40),
        "vgg": (lambda: digits_vgg(16), 15)}                    # name -> (model, training epochs)
# the ResNet-18 is trained as ResNets are (decoupled weight decay, cosine-annealed lr): with the
# digits nets' constant-lr Adam it stalls near 93% train accuracy (width 8: 88.7% test; its eval-mode
# accuracy swings by 20 points between epochs as BN statistics chase the last updates)
RESNET_TRAINING = dict(lr=3e-3, weight_decay=1e-2)
CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".cache", "bench-conversion")

SNNC_FIXED = {   # per-step graphs (one conversion, every T from one run)
    "p99.9": dict(method="percentile", q=99.9),
    "p99.9-cw-half": dict(method="percentile", q=99.9, channel_wise=True, v_init_fraction=0.5),
}
MAX_POOL_MODES = ("gate", "spikes")   # besides the default's "lateral": measured on the nets with MaxPool

# hybrid fine-tuning from the default conversion: (surrogate, T, Adam lr, epochs)
HYBRID = (("triangle", 4, 1e-3, 5), ("stdb", 4, 1e-3, 5))
HYBRID_QUICK = (("triangle", 4, 1e-3, 3), ("stdb", 4, 1e-3, 3))
HYBRID_NETS = ("cnn", "vgg")


def emit(**row):
    print(json.dumps(row), flush=True)


def trained(net, data, epochs, seed=0):
    """The ANN, trained once (Adam, lr 3e-3; the ResNet-18: ``_train_resnet``) and cached by name,
    epochs and seed. The seed is set before the net is built, so its init follows the seed too and a
    fresh cache rebuilds the same ANN whatever ran before in the process (the digits nets' seed 0
    used to be built unseeded: their files carried no seed tag, and they now carry "-s0")."""
    make = NETS[net][0]
    tag = f"{'-w16-adamw-cos' if net == 'resnet18' else ''}{f'-s{seed}' if seed or net != 'resnet18' else ''}"
    path = os.path.join(CACHE, f"{net}-e{epochs}{tag}.pt")
    torch.manual_seed(seed)
    model = make()
    if os.path.exists(path):
        model.load_state_dict(torch.load(path, weights_only=True))
        return model.eval(), 0.0
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = (_train_resnet(model, data, epochs, seed) if net == "resnet18"
             else train_ann(model, data, epochs=epochs, seed=seed))
    os.makedirs(CACHE, exist_ok=True)
    tmp = path + ".tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path)
    return model, time.perf_counter() - t0


def _train_resnet(model, data, epochs, seed=0):
    """AdamW, cosine-annealed to 0 over all steps, batch 64."""
    opt = torch.optim.AdamW(model.parameters(), **RESNET_TRAINING)
    train, _ = data.loaders(batch_size=64, seed=seed)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(train))
    model.train()
    for _ in range(epochs):
        for x, y in train:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


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


def firing_rates(g, x):
    """Mean spikes per neuron and step of every IF layer of the multi-step graph ``g`` on ``x``."""
    rates, hooks = {}, []
    for name, m in g.named_modules():
        if isinstance(m, IF):
            hooks.append(m.register_forward_hook(lambda _m, _a, out, name=name: rates.__setitem__(name, out.mean().item())))
    with torch.no_grad():
        snnc.run(g, x)
    for h in hooks:
        h.remove()
    return {k: round(v, 4) for k, v in rates.items()}


def record(results, net, lib, method, accs, t0, seed=None, **extra):
    """One ``snn`` line per T (``snn_seed`` with its seed in a ``--seeds`` run)."""
    tag = {} if seed is None else {"seed": seed}
    for T, a in accs.items():
        emit(kind="snn" if seed is None else "snn_seed", net=net, lib=lib, method=method, T=T, acc=round(a, 2),
             seconds=round(time.perf_counter() - t0, 1), **tag, **extra)
        results[(net, lib, method, T)] = a


def default_curve(net, ann, data, calib, Ts, results, name="default", seed=None, **options):
    """snnc.convert(ann, calib, T=T) for each T: the recipe is chosen for each T."""
    t0, accs, tag = time.perf_counter(), {}, ({} if seed is None else {"seed": seed})
    for T in Ts:
        t1 = time.perf_counter()
        g = snnc.convert(ann, calib, T=T, **options)
        seconds = time.perf_counter() - t1
        accs[T] = accuracy(lambda x: snnc.run(g, x), data.x_test, data.y_test)
        rep = g.snnc_conversion
        if name == "default":
            emit(kind="chosen", net=net, T=T, **tag, method=rep["method"],
                 convert_seconds=round(seconds, 1),
                 scores={k: [v["agreement"], v["kl"]] for k, v in rep.get("scores", {}).items()},
                 readout_calibration=rep.get("readout_calibration"))
            if T == 8:
                emit(kind="firing", net=net, T=T, **tag,
                     rates=firing_rates(g, data.x_test[:128]))
    record(results, net, "snnc", name, accs, t0, seed)
    return accs


def snnc_curves(net, ann, data, calib, Ts, results, has_max_pool):
    default_curve(net, ann, data, calib, Ts, results)
    if has_max_pool:
        for mode in MAX_POOL_MODES:
            default_curve(net, ann, data, calib, Ts, results, name=f"default/max_pool={mode}", max_pool=mode)
    folded = fold_bn(snnc.trace(ann, data.x_test[:1]))
    for name, opts in SNNC_FIXED.items():
        t0 = time.perf_counter()
        try:
            g = threshold_balance(folded, calib, **opts)
        except SnncError as e:
            emit(kind="skip", net=net, lib="snnc", method=name, reason=str(e)[:200])
            continue
        record(results, net, "snnc", name, curve(g, lambda: snnc.reset(g), data.x_test, data.y_test, Ts,
                                                running_mean=True), t0)


def avg_pool_curve(net, ann, data, calib, Ts, results, ann_acc, epochs):
    """The classic detour: MaxPool -> AvgPool in the ANN, fine-tune, convert (default)."""
    t0 = time.perf_counter()
    torch.manual_seed(0)
    m = train_ann(max_pool_to_avg_pool(ann).train(), data, epochs=epochs, lr=1e-3)
    ann_acc[f"{net}-avgpool"] = a = accuracy(m, data.x_test, data.y_test)
    emit(kind="ann", net=f"{net}-avgpool", acc=round(a, 2), fine_tune_epochs=epochs,
         train_seconds=round(time.perf_counter() - t0, 1))
    default_curve(net, m, data, calib, Ts, results, name=f"default/avgpool+ft{epochs}")


def qcfs_curve(net, ann, data, calib, Ts, results, ann_acc, epochs, L):
    """Bu 2022: the trained ANN's ReLUs -> QCFS(L), fine-tuned, converted with its thresholds."""
    t0 = time.perf_counter()
    q = train_qcfs(ann, data, epochs=epochs, L=L)
    ann_acc[f"{net}-qcfs"] = a = accuracy(q, data.x_test, data.y_test)
    emit(kind="ann", net=f"{net}-qcfs", acc=round(a, 2), L=L, fine_tune_epochs=epochs,
         train_seconds=round(time.perf_counter() - t0, 1))
    g = snnc.convert(q, calib, method="qcfs")
    record(results, net, "snnc", f"qcfs(L={L})",
           curve(g, lambda: snnc.reset(g), data.x_test, data.y_test, Ts, running_mean=True), t0)


def sj_curves(net, ann, data, Ts, results, seed=None):
    try:
        from spikingjelly.activation_based import ann2snn, functional
    except ImportError as e:
        emit(kind="skip", net=net, lib="spikingjelly", reason=f"not installed: {e}")
        return
    calib = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.x_train, data.y_train), batch_size=128)
    recipes = {
        "max": lambda: ann2snn.RateCodingRecipe(dataloader=calib, mode="max"),
        "99.9%": lambda: ann2snn.RateCodingRecipe(dataloader=calib, mode="99.9%"),
        "1/2": lambda: ann2snn.RateCodingRecipe(dataloader=calib, mode=0.5),
        "99.9%-cw-half": lambda: ann2snn.RateCodingRecipe(dataloader=calib, mode="99.9%", channel_wise=True,
                                                          half_threshold=True),
        "99.9%-cw-half-premaxpool": lambda: ann2snn.RateCodingRecipe(
            dataloader=calib, mode="99.9%", channel_wise=True, half_threshold=True, pre_spike_maxpool=True),
        "ltb": lambda: ann2snn.LocalThresholdBalancingRecipe(dataloader=calib),
    }
    for name, recipe in recipes.items():
        t0 = time.perf_counter()
        try:
            snn = ann2snn.Converter(recipe=recipe(), device="cpu").convert(copy.deepcopy(ann))
            acc = curve(snn, lambda: functional.reset_net(snn), data.x_test, data.y_test, Ts)
        except Exception as e:  # a peer's failure is a result to report, not a crash of the bench
            emit(kind="skip", net=net, lib="spikingjelly", method=name, reason=f"{type(e).__name__}: {e}"[:200])
            continue
        record(results, net, "spikingjelly", name, acc, t0, seed)


def hybrid(net, ann, data, calib, T, epochs, lr, kind, method=None):
    """Rathi 2020: convert (the default for T, or ``method``: "percentile" is the paper's start),
    unroll, surrogate ``kind`` (``stdb`` or the linear ``triangle``), train a few epochs with Adam."""
    g = snnc.convert(ann, calib, T=T, method=method)
    start = accuracy(lambda x: snnc.run(g, x), data.x_test, data.y_test)
    emit(kind="hybrid", net=net, T=T, epoch=0, acc=round(start, 2), surrogate=kind, lr=lr,
         conversion=g.snnc_conversion["method"])
    g = insert_surrogate(g, kind)
    train, test = data.loaders(batch_size=64, seed=0)
    torch.manual_seed(0)
    hist = snnc.retrain(g, train, epochs=epochs, lr=lr, val_loader=test)
    for row in hist:
        emit(kind="hybrid", net=net, T=T, epoch=row["epoch"], acc=round(row["val_acc"], 2), surrogate=kind,
             lr=lr, seconds=round(row["seconds"], 1))
    return [row["val_acc"] for row in hist]


def checks(results, ann_acc, hybrid_acc, max_pool_nets):
    for net in [n for n in ann_acc if n in NETS]:
        for T in (2, 4, 8):
            ours = results.get((net, "snnc", "default", T))
            peer = {m: v for (n, lb, m, t), v in results.items() if n == net and lb == "spikingjelly" and t == T}
            if ours is None or not peer:
                continue
            mj, j = max(peer.items(), key=lambda kv: kv[1])
            emit(kind="check", name=f"{net}_T{T}_default_vs_best_spikingjelly", snnc=round(ours, 2),
                 spikingjelly=round(j, 2), spikingjelly_method=mj, ratio=round(ours / max(j, 1e-9), 4),
                 ok=round(ours, 2) >= round(j, 2))
    for net in max_pool_nets:
        accs = {T: v for (n, lb, m, T), v in results.items() if (n, lb, m) == (net, "snnc", "default")}
        if 8 in accs:
            emit(kind="check", name=f"{net}_default_T8_within_1pt_of_ann", ann=round(ann_acc[net], 2),
                 snn=round(accs[8], 2), gap=round(ann_acc[net] - accs[8], 2), ok=ann_acc[net] - accs[8] <= 1.0)
        big = sorted(T for T in accs if T >= 8)
        if len(big) > 1:
            drops = [round(accs[a] - accs[b], 2) for a, b in zip(big, big[1:])]
            emit(kind="check", name=f"{net}_default_never_loses_accuracy_T8_to_T{big[-1]}",
                 accs={T: round(accs[T], 2) for T in big}, largest_drop=max(drops + [0.0]), ok=max(drops) <= 0.0)
    for (net, T, kind), accs in hybrid_acc.items():
        within = [e + 1 for e, a in enumerate(accs) if ann_acc[net] - a <= 1.0]
        emit(kind="check", name=f"{net}_hybrid_{kind}_T{T}_within_1pt_of_ann_in_5_epochs", ann=round(ann_acc[net], 2),
             snn=round(accs[-1], 2), best=round(max(accs), 2), first_epoch_within_1pt=within[0] if within else None,
             ok=bool(within) and within[0] <= 5)


def plot(results, ann_acc, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nets = sorted({k[0] for k in results})
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
        ax.legend(fontsize=6)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    emit(kind="plot", path=path)


def seed_runs(nets, data, args):
    """``--seeds K``: for each net and seed, the ANN, snnc's default and every spikingjelly recipe at
    T=2, 4, 8 (per-seed rows are ``snn_seed`` lines), then the statistics of bench/_seeds.py."""
    import _seeds
    Ts, calib, rows = (2, 4, 8), data.x_train[:512], []
    per_seed, ann_acc = {}, {}
    for net in nets:
        for seed in range(args.seed_start, args.seed_start + args.seeds):
            ann, seconds = trained(net, data, NETS[net][1], seed)
            ann_acc[(net, seed)] = accuracy(ann, data.x_test, data.y_test)
            emit(kind="ann", net=net, seed=seed, acc=round(ann_acc[(net, seed)], 2),
                 train_seconds=round(seconds, 1), cached=seconds == 0.0)
            results = {}
            default_curve(net, ann, data, calib, Ts, results, seed=seed)
            if not args.no_peer:
                sj_curves(net, ann, data, Ts, results, seed=seed)
            for key, acc in results.items():
                per_seed.setdefault(key, {})[seed] = acc
        for row in _seeds.summaries(per_seed, ann_acc, net, Ts):
            emit(**row)
            rows.append(row)
    if any(r["kind"] == "seeds" for r in rows):
        _seeds.plot(rows, args.plot)
        emit(kind="plot", path=args.plot)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer T values, epochs and runs")
    ap.add_argument("--plot", default=os.path.join(os.path.dirname(__file__), "out", "conversion.png"))
    ap.add_argument("--no-peer", action="store_true", help="skip spikingjelly")
    ap.add_argument("--hybrid-from-percentile", action="store_true",
                    help="also fine-tune from a percentile conversion (Rathi 2020's start), not only the default's")
    ap.add_argument("--only-hybrid", action="store_true", help="skip the conversion curves (hybrid fine-tuning only)")
    ap.add_argument("--no-hybrid", action="store_true", help="skip hybrid fine-tuning (conversion curves only)")
    ap.add_argument("--nets", default=",".join(NETS), help=f"comma-separated subset of {','.join(NETS)}")
    ap.add_argument("--seeds", type=int, default=1,
                    help="K > 1: K ANNs per net (seeds S..S+K-1), only the default vs spikingjelly at T=2,4,8, "
                         "with mean, std and the paired difference over the K ANNs")
    ap.add_argument("--seed-start", type=int, default=0,
                    help="S: the first training seed of a --seeds run (e.g. 5 with --seeds 5: seeds 5-9)")
    args = ap.parse_args(argv)
    nets = [n.strip() for n in args.nets.split(",") if n.strip()]
    unknown = [n for n in nets if n not in NETS]
    if unknown:
        ap.error(f"--nets: unknown {unknown}; choose from {list(NETS)}")
    if args.seeds < 1:
        ap.error(f"--seeds: {args.seeds}; give at least 1")
    if args.seed_start < 0 or (args.seed_start and args.seeds < 2):
        ap.error(f"--seed-start: {args.seed_start}; a seed >= 0, with --seeds K > 1")
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    data = digits()
    if args.seeds > 1:
        return seed_runs(nets, data, args)
    Ts = (2, 4, 8, 64) if args.quick else (2, 4, 8, 16, 32, 64)
    calib = data.x_train[:512]
    results, ann_acc, hybrid_acc, max_pool_nets = {}, {}, {}, []
    for net in nets:
        ann, seconds = trained(net, data, NETS[net][1])
        ann_acc[net] = accuracy(ann, data.x_test, data.y_test)
        emit(kind="ann", net=net, acc=round(ann_acc[net], 2), train_seconds=round(seconds, 1), cached=seconds == 0.0)
        has_max_pool = any(isinstance(m, torch.nn.MaxPool2d) for m in ann.modules())
        if has_max_pool:
            max_pool_nets.append(net)
        if not args.only_hybrid:
            snnc_curves(net, ann, data, calib, Ts, results, has_max_pool and not args.quick)
            if not args.no_peer:
                sj_curves(net, ann, data, Ts, results)
            if has_max_pool and not args.quick:
                avg_pool_curve(net, ann, data, calib, Ts, results, ann_acc, epochs=2)
            qcfs_curve(net, ann, data, calib, Ts, results, ann_acc, epochs=1 if args.quick else 3, L=4)
        if net in HYBRID_NETS and not args.no_hybrid:
            for kind, T, lr, n_epochs in (HYBRID_QUICK if args.quick else HYBRID):
                hybrid_acc[(net, T, kind)] = hybrid(net, ann, data, calib, T, n_epochs, lr, kind)
                if args.hybrid_from_percentile:   # Rathi 2020's start: a percentile-balanced SNN
                    hybrid_acc[(net, T, f"{kind}-from-percentile")] = hybrid(net, ann, data, calib, T, n_epochs, lr,
                                                                             kind, method="percentile")
    checks(results, ann_acc, hybrid_acc, max_pool_nets)
    if results:
        plot(results, ann_acc, args.plot)


if __name__ == "__main__":
    sys.exit(main())
