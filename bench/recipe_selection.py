"""Which label-free signal can pick snnc's conversion recipe? Every candidate of the default's search,
on several trained ANNs, against the test accuracy it would give and spikingjelly 2.0's recipes on
the same ANNs in the same run.

    .venv/bin/python bench/recipe_selection.py --seeds 5                  (ANNs of seeds 0-4)
    .venv/bin/python bench/recipe_selection.py --seeds 5 --seed-start 5   (fresh ANNs 5-9: confirmation)
    .venv/bin/python bench/recipe_selection.py --from RUN.jsonl            (the summaries again, from lines)

Why: the default (``snnc._recipe_search``) picks by agreement with the ANN on the calibration inputs,
ties broken by KL(ANN || SNN). On the digits CNN at T >= 4 nearly every candidate agrees on all of
them, so the pick is the tie-break, and the default trails spikingjelly's per-ANN best recipe by a
few tenths of a point. This bench asks whether any label-free signal would pick better, and how far
off that comparison's own ceiling is: the peer's "best" is picked per ANN on the *test labels*.

Per ANN (``conversion.trained``: same nets, seeds and cache as bench/conversion.py) and T in 2, 4, 8,
each candidate (``CANDIDATES`` plus ``EXTRA``: the max-scaled recipes spikingjelly's "1/2" uses) is
converted, its readout refitted as the default does (kept where it lowers held-out KL), and run on
  * the calibration inputs (what the default scores on),
  * mixup blends of pairs of them (Zhang 2018: inputs between two digits, where the ANN's decision
    is close and a conversion's errors change it -- the calibration images themselves are far from
    any boundary),
  * noisy copies (Gaussian, sigma 0.2, clipped to the input range),
  * the test inputs (agreement with the ANN there: a ceiling no chooser without the test set reaches),
recording agreement with the ANN's argmax, KL(ANN || SNN) and the logits' MSE on each. Binary
candidates only: where none reaches ``BURST_BELOW`` agreement the default also tries burst candidates
(bench/conversion.py's ``chosen`` lines show the default's actual pick). Lines:
  {"kind": "candidate", "net", "seed", "T", "cand", "acc", "acc_readout_off", "readout_applied", signals}
  {"kind": "snn_seed", ...}   spikingjelly's recipes (bench/conversion.py's lines)
  {"kind": "signal", "net", "T", "signal", "kendall_tau", "seeds"}   mean over ANNs of Kendall's tau-b
      between the signal and the test accuracy across the candidates above 95% (how well it ranks)
  {"kind": "rule", "net", "T", "rule", "snnc_mean", "diff_vs_sj_best", "diff_se", "picks", "seeds"}
      a selection rule's test accuracy and its paired difference from spikingjelly's per-ANN best
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import numpy as np
import torch
from tqdm.auto import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _seeds  # noqa: E402
import conversion  # noqa: E402

Ts = (2, 4, 8)
EXTRA = {"max-half": dict(method="max", scale=0.5),   # spikingjelly's "1/2": half the max activation
         "max-half-cw": dict(method="max", scale=0.5, channel_wise=True),
         "max-half-vh": dict(method="max", scale=0.5, v_init_fraction=0.5),
         "p99.9-half": dict(method="percentile", scale=0.5)}
SETS = ("calib", "mix", "noisy", "test")


def probe_inputs(calib, seed=0):
    """``{"mix": blends of shuffled pairs (weights in [0.3, 0.7]), "noisy": calib + N(0, 0.2^2)}``."""
    g = torch.Generator().manual_seed(seed)
    n = len(calib)
    i, j = torch.randperm(n, generator=g), torch.randperm(n, generator=g)
    lam = 0.3 + 0.4 * torch.rand((n,) + (1,) * (calib.dim() - 1), generator=g)
    noisy = calib + 0.2 * torch.randn(calib.shape, generator=g)
    return {"mix": lam * calib[i] + (1 - lam) * calib[j], "noisy": noisy.clamp(calib.min(), calib.max())}


def candidate_rows(net, seed, ann, data, calib):
    """One ``candidate`` row per (T, candidate) for one ANN (see the module docstring)."""
    import copy
    import snnc
    from snnc._recipe_search import CANDIDATES
    from snnc.passes import fold_bn, threshold_balance, unroll_timesteps
    from snnc.passes._calibration import calibration_batches
    from snnc.passes._readout_calibration import calibrate_readout, kl_to_ann
    folded = fold_bn(snnc.trace(ann, data.x_test[:1]))
    inputs = {"calib": calib, **probe_inputs(calib), "test": data.x_test}
    with torch.no_grad():
        want = {k: folded(x) for k, x in inputs.items()}
    batches = calibration_batches(calib)
    rows = []
    for T in Ts:
        for cand, opts in {**CANDIDATES, **EXTRA}.items():
            snn = threshold_balance(folded, calib, **opts, T_target=T)
            plain = copy.deepcopy(snn)
            plain.snnc_spec = copy.deepcopy(snn.snnc_spec)
            applied = calibrate_readout(snn, folded, batches, T)["applied"]
            row = dict(kind="candidate", net=net, seed=seed, T=T, cand=cand, readout_applied=applied)
            # the signals of the SNN before the readout refit: the default scores candidates so and
            # refits only the winner's readout
            for tag, g in (("", snn), ("_readout_off", plain)):
                with torch.no_grad():
                    got = {k: snnc.run(unroll_timesteps(g, T), x) for k, x in inputs.items()}
                row[f"acc{tag}"] = round(100.0 * float((got["test"].argmax(-1) == data.y_test).float().mean()), 2)
                if not tag:
                    continue
                for k in SETS:
                    row[f"agree_{k}"] = round(100.0 * float((got[k].argmax(-1) == want[k].argmax(-1)).float().mean()), 3)
                    row[f"kl_{k}"] = float(f"{kl_to_ann(got[k], want[k]):.5g}")
                    row[f"mse_{k}"] = float(f"{float(((got[k] - want[k]) ** 2).mean()):.5g}")
            rows.append(row)
    return rows


def kendall_tau(a, b) -> float:
    """Kendall's tau-b of two equal-length sequences (ties in either count as neither concordant nor
    discordant; NaN when one of them is constant)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    iu = np.triu_indices(len(a), 1)
    da, db = np.sign(a[:, None] - a[None, :])[iu], np.sign(b[:, None] - b[None, :])[iu]
    denom = np.sqrt(np.count_nonzero(da) * np.count_nonzero(db))
    return float((da * db).sum() / denom) if denom else float("nan")


def _higher_better(signal):
    return -1.0 if signal.startswith(("kl_", "mse_")) else 1.0


RULES = {   # name -> (candidates allowed, sort key: the largest wins)
    "the default's rule: agree_calib, kl_calib": ("base", lambda r: (r["agree_calib"], -r["kl_calib"])),
    "the default's rule, readout not refitted": ("base", lambda r: (r["agree_calib"], -r["kl_calib"])),
    "agree_mix, kl_mix": ("base", lambda r: (r["agree_mix"], -r["kl_mix"])),
    "kl_mix": ("base", lambda r: -r["kl_mix"]),
    "agree_noisy, kl_noisy": ("base", lambda r: (r["agree_noisy"], -r["kl_noisy"])),
    "+max-half: agree_calib, kl_calib": ("all", lambda r: (r["agree_calib"], -r["kl_calib"])),
    "+max-half: agree_mix, kl_mix": ("all", lambda r: (r["agree_mix"], -r["kl_mix"])),
    "+max-half: agree_calib, agree_mix, kl_mix": ("all", lambda r: (r["agree_calib"], r["agree_mix"], -r["kl_mix"])),
    "ceiling: agree_test, kl_test (uses the test inputs)": ("all", lambda r: (r["agree_test"], -r["kl_test"])),
    "oracle: acc (test labels, as sj best)": ("all", lambda r: r["acc"]),
}


def summaries(cand_rows, sj_rows):
    """The ``signal`` and ``rule`` rows of every (net, T) over the ANNs that have both snnc and sj lines."""
    out = []
    by = {}
    for r in cand_rows:
        by.setdefault((r["net"], r["T"], r["seed"]), {})[r["cand"]] = r
    sj = {}
    for r in sj_rows:
        sj.setdefault((r["net"], r["T"], r["seed"]), []).append(r["acc"])
    for net, T in sorted({(n, t) for n, t, _ in by}):
        seeds = sorted(s for n, t, s in by if (n, t) == (net, T) and (net, T, s) in sj)
        if not seeds:
            continue
        base = set(by[(net, T, seeds[0])]) - set(EXTRA)
        signals = [k for k in by[(net, T, seeds[0])][next(iter(base))] if k.split("_")[0] in ("agree", "kl", "mse")]
        for sig in signals:
            taus = []
            for s in seeds:
                good = [r for r in by[(net, T, s)].values() if r["acc"] > 95.0]
                t = kendall_tau([_higher_better(sig) * r[sig] for r in good], [r["acc"] for r in good])
                if t == t:
                    taus.append(t)
            out.append(dict(kind="signal", net=net, T=T, signal=sig, seeds=seeds,
                            kendall_tau=round(statistics.fmean(taus), 3) if taus else None))
        best = [max(sj[(net, T, s)]) for s in seeds]
        for name, (allowed, key) in RULES.items():
            acc_key = "acc_readout_off" if "not refitted" in name else "acc"
            picks = [max((r for c, r in by[(net, T, s)].items() if allowed == "all" or c in base), key=key)
                     for s in seeds]
            accs = [r[acc_key] for r in picks]
            dm, dse = _seeds.paired(accs, best)
            out.append(dict(kind="rule", net=net, T=T, rule=name, seeds=seeds,
                            snnc_mean=round(statistics.fmean(accs), 2), sj_best_mean=round(statistics.fmean(best), 2),
                            diff_vs_sj_best=round(dm, 3), diff_se=round(dse, 3), picks=[r["cand"] for r in picks]))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", default="cnn", help=f"comma-separated subset of {','.join(conversion.NETS)}")
    ap.add_argument("--seeds", type=int, default=5, help="K ANNs per net")
    ap.add_argument("--seed-start", type=int, default=0, help="first training seed (5: fresh ANNs 5..5+K-1)")
    ap.add_argument("--from", dest="lines", help="only the summaries, from the lines of an earlier run")
    args = ap.parse_args(argv)
    if args.lines:
        with open(args.lines) as f:
            rows = [json.loads(line) for line in f if line.startswith("{")]
    else:
        nets = [n.strip() for n in args.nets.split(",") if n.strip()]
        if unknown := [n for n in nets if n not in conversion.NETS]:
            ap.error(f"--nets: unknown {unknown}; choose from {list(conversion.NETS)}")
        if args.seeds < 1 or args.seed_start < 0:
            ap.error(f"--seeds {args.seeds} / --seed-start {args.seed_start}: need K >= 1 and a seed >= 0")
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
        from snnc.data import digits
        data, rows = digits(), []
        calib = data.x_train[:512]   # what bench/conversion.py calibrates on
        for net in nets:
            for seed in tqdm(range(args.seed_start, args.seed_start + args.seeds), desc=net, disable=None):
                ann, _ = conversion.trained(net, data, conversion.NETS[net][1], seed)
                for r in candidate_rows(net, seed, ann, data, calib):
                    conversion.emit(**r)
                    rows.append(r)
                results = {}
                conversion.sj_curves(net, ann, data, Ts, results, seed=seed)
                rows += [dict(kind="snn_seed", net=n, lib=lib, method=m, T=t, seed=seed, acc=round(a, 2))
                         for (n, lib, m, t), a in results.items()]
    cands = [r for r in rows if r.get("kind") == "candidate"]
    sj = [r for r in rows if r.get("kind") == "snn_seed" and r.get("lib") == "spikingjelly"]
    for r in summaries(cands, sj):
        conversion.emit(**r)


if __name__ == "__main__":
    sys.exit(main())
