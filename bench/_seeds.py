"""Statistics over training seeds for bench/conversion.py ``--seeds K``.

    .venv/bin/python bench/_seeds.py RUN.jsonl [--plot PATH]   (the summaries again, from a run's lines)

Why: on 450 test images one image is 0.22 points, and two ANNs trained from different seeds differ
by more than that, so "snnc's default >= spikingjelly's best on the same ANN" measured on one ANN is
a coin toss whenever both are within an image or two of each other. Over K ANNs the comparison is
paired -- both converters see the same ANN and the same test images -- so the quantity to report is
the mean of the per-ANN differences with its standard error (std / sqrt(K)), not two means whose
spreads overlap.

"spikingjelly best" is, per ANN and T, the best of its recipes picked on the *test labels* (an oracle
choice, generous to the peer); snnc's default picks its recipe without labels. The recipe that is
best on the mean over ANNs is reported beside it, with the paired difference against it: the
per-ANN maximum over six recipes gains from picking, per ANN, whichever recipe the test images
happen to favour (the mean of a maximum of noisy values exceeds the maximum of their means).

Assumes ``per_seed[(net, lib, method, T)] = {seed: accuracy %}`` with the same seeds for every key.
Guarantees: one ``seeds`` line per (net, T) and one ``check`` line on the means per (net, T).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys


def mean_std(values):
    """``(mean, sample std)``; std is 0.0 for a single value."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(ours, peer):
    """``(mean difference, its standard error)`` of ``ours[i] - peer[i]`` (same ANN i)."""
    diffs = [a - b for a, b in zip(ours, peer, strict=True)]
    m, s = mean_std(diffs)
    return m, s / math.sqrt(len(diffs))


def summaries(per_seed, ann_acc, net, Ts):
    """The ``seeds`` and ``check`` rows of ``net`` (dicts, to be printed as JSON lines)."""
    rows = []
    seeds = sorted(per_seed.get((net, "snnc", "default", Ts[0]), {}))
    if not seeds:
        return rows
    anns = [ann_acc[(net, s)] for s in seeds]
    for T in Ts:
        # at the lines' precision (0.01 points), so a summary rebuilt from the lines is the same
        ours = [round(per_seed[(net, "snnc", "default", T)][s], 2) for s in seeds]
        recipes = {m: [round(accs[s], 2) for s in seeds] for (n, lib, m, t), accs in per_seed.items()
                   if (n, lib, t) == (net, "spikingjelly", T) and all(s in accs for s in seeds)}
        if not recipes:
            continue
        best = [max(r[i] for r in recipes.values()) for i in range(len(seeds))]
        best_methods = [max(recipes, key=lambda m: recipes[m][i]) for i in range(len(seeds))]
        best_on_mean = max(recipes, key=lambda m: statistics.fmean(recipes[m]))
        (om, osd), (pm, psd) = mean_std(ours), mean_std(best)
        dm, dse = paired(ours, best)
        fm, fse = paired(ours, recipes[best_on_mean])
        rows.append(dict(kind="seeds", net=net, T=T, seeds=seeds, ann=[round(a, 2) for a in anns],
                         ann_mean=round(statistics.fmean(anns), 2),
                         snnc_default=[round(a, 2) for a in ours], snnc_mean=round(om, 2), snnc_std=round(osd, 2),
                         spikingjelly_best=[round(a, 2) for a in best], spikingjelly_best_methods=best_methods,
                         spikingjelly_mean=round(pm, 2), spikingjelly_std=round(psd, 2),
                         spikingjelly_best_recipe_on_mean=best_on_mean,
                         spikingjelly_best_recipe_on_mean_acc=round(statistics.fmean(recipes[best_on_mean]), 2),
                         diff_mean=round(dm, 3), diff_se=round(dse, 3),
                         diff_vs_recipe_on_mean=round(fm, 3), diff_vs_recipe_on_mean_se=round(fse, 3),
                         wins_ties_losses=[sum(a > b for a, b in zip(ours, best)),
                                           sum(a == b for a, b in zip(ours, best)),
                                           sum(a < b for a, b in zip(ours, best))]))
        rows.append(dict(kind="check", name=f"{net}_T{T}_default_vs_best_spikingjelly_mean_of_{len(seeds)}_seeds",
                         snnc=round(om, 2), spikingjelly=round(pm, 2), ratio=round(om / max(pm, 1e-9), 4),
                         diff_mean=round(dm, 3), diff_se=round(dse, 3), ok=round(om, 2) >= round(pm, 2)))
    return rows


def plot(rows, path):
    """Per net: accuracy vs T (snnc default and spikingjelly's best, mean +- std over seeds) and, below,
    the paired difference snnc - spikingjelly (mean +- standard error): the spread over seeds is
    mostly that of the ANNs themselves, which the paired difference removes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    nets = sorted({r["net"] for r in rows if r["kind"] == "seeds"})
    fig, axes = plt.subplots(2, len(nets), figsize=(5 * len(nets), 6.5), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1]})
    for ax, dax, net in zip(axes[0], axes[1], nets):
        rs = sorted((r for r in rows if r["kind"] == "seeds" and r["net"] == net), key=lambda r: r["T"])
        Ts = [r["T"] for r in rs]
        for key, style, label in (("snnc", "-o", "snnc default"), ("spikingjelly", "--s", "spikingjelly best")):
            ax.errorbar(Ts, [r[f"{key}_mean"] for r in rs], yerr=[r[f"{key}_std"] for r in rs], fmt=style,
                        ms=4, capsize=3, label=f"{label} (mean +- std)")
        ax.axhline(rs[0]["ann_mean"], color="k", lw=0.8, ls=":", label="ANN (mean)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(Ts, [str(t) for t in Ts])
        ax.minorticks_off()
        ax.set_xlabel("time steps T")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"digits {net}, {len(rs[0]['seeds'])} ANNs")
        ax.legend(fontsize=7)
        dax.errorbar(Ts, [r["diff_mean"] for r in rs], yerr=[r["diff_se"] for r in rs], fmt="-o", ms=4, capsize=3)
        dax.axhline(0.0, color="k", lw=0.8)
        dax.set_xscale("log", base=2)
        dax.set_xticks(Ts, [str(t) for t in Ts])
        dax.minorticks_off()
        dax.set_xlabel("time steps T")
        dax.set_ylabel("snnc - spikingjelly\n(points, mean +- s.e.)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def from_lines(rows):
    """``(per_seed, ann_acc, nets)`` rebuilt from a run's ``ann`` and ``snn_seed`` lines."""
    per_seed, ann_acc = {}, {}
    for r in rows:
        if r.get("kind") == "snn_seed":
            per_seed.setdefault((r["net"], r["lib"], r["method"], r["T"]), {})[r["seed"]] = r["acc"]
        elif r.get("kind") == "ann" and "seed" in r:
            ann_acc[(r["net"], r["seed"])] = r["acc"]
    return per_seed, ann_acc, sorted({k[0] for k in per_seed})


def main(argv=None):
    ap = argparse.ArgumentParser(description="the --seeds summaries of a bench/conversion.py run, from its lines")
    ap.add_argument("run", help="JSON lines of a bench/conversion.py --seeds run")
    ap.add_argument("--plot", help="also save the plot there")
    args = ap.parse_args(argv)
    with open(args.run) as f:
        rows = [json.loads(line) for line in f if line.startswith("{")]
    per_seed, ann_acc, nets = from_lines(rows)
    if not nets:
        ap.error(f"{args.run}: no snn_seed lines (not a --seeds run)")
    out = [row for net in nets for row in summaries(per_seed, ann_acc, net, (2, 4, 8))]
    for row in out:
        print(json.dumps(row), flush=True)
    if args.plot and out:
        plot(out, args.plot)


if __name__ == "__main__":
    sys.exit(main())
