"""The default of ``snnc.convert``: pick the conversion recipe for a given T by measurement.

Which recipe converts best depends on T and on the network: percentile scales (Rueckauer 2017)
win at large T, clip values tuned for T with a half-threshold start (Li 2021 / Bu 2022) at small
T, channel-wise scales on nets whose channels differ in range, bias correction (Li 2021) where a
systematic rate-code error accumulates over depth. Rather than a fixed rule, every candidate is
converted and run for T steps on the calibration inputs (all of them, up to ``SCORE_SAMPLES``, in
batches of ``SCORE_BATCH``), and scored by how often its prediction agrees with the ANN's own
prediction on the same inputs (no labels needed). Ties -- common: at T >= 4 several recipes agree
with the ANN on every calibration input of a small net -- are broken by a finer label-free signal of
the same kind, KL(ANN || SNN) of the softmax outputs (the distillation distance, Hinton 2015): how
much of the ANN's confidence in each class the SNN keeps, rather than the logit MSE, which also
counts offsets and scale errors of the logits that change no decision. Scores are reported, so the
choice can be checked and reproduced with ``method=`` and the reported options.

What the signal cannot do (measured, ``bench/recipe_selection.py``, digits CNN, ten ANNs): at T=8 the
candidates differ by one or two test images, and label-free signals rank them only weakly
(Kendall's tau with test accuracy 0.06-0.22 for agreement on the calibration inputs, 0.13-0.14 on mixup
blends of them, 0.20-0.24 even for agreement with the ANN on the *test* inputs). Rules built on mixup
blends, noisy inputs, or with spikingjelly's max-half recipes added, looked better on five ANNs and did
not hold on five fresh ones (none was at least as good at every T on both sets), so the rule above
is kept.

The chosen SNN's readout is then calibrated on its own outputs (``readout_calibration``: the output
layer fitted per class to the ANN's logits, kept only if that lowers KL(ANN || SNN) on held-out
calibration inputs; ``passes/_readout_calibration.py``): it corrects what the chosen rate code still
gets wrong at the output, and costs one more T-step run of one net, not of every candidate.

Burst candidates (``snnc.ops.BurstIF``: up to ``BURST`` spikes per step, Li & Zeng 2022) represent
T * BURST levels in T steps, which is what deep nets (a ResNet-18) need at T <= 8. Their spikes are
small counts rather than 0/1, so they are tried only when no binary candidate agrees with the ANN
on at least ``BURST_BELOW`` % of the calibration inputs, and win only by more than
``BURST_MARGIN`` points of agreement; ``burst=1`` forbids them, ``burst=k`` fixes k.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from snnc.errors import SnncError

SCORE_SAMPLES = 1024  # calibration inputs each candidate runs on (the first ones): all of a typical calib set
SCORE_BATCH = 256     # inputs per scoring run (bounds the memory of a T-step unrolled run)
BIAS_CORRECTION_MAX_T = 16   # above it the rate-code bias is small and the correction's T-step runs per
                             # layer cost the most: such candidates are not tried unless asked for

BURST = 4            # spikes per step of the burst candidates
BURST_BELOW = 99.0   # agreement (%) under which the burst candidates are tried
BURST_MARGIN = 1.0   # points of agreement a burst candidate must gain over the best binary one

# name -> threshold_balance options (T_target is set to the T scored at)
CANDIDATES = {
    "percentile": dict(method="percentile"),
    "percentile-cw": dict(method="percentile", channel_wise=True),
    "percentile-cw-half": dict(method="percentile", channel_wise=True, v_init_fraction=0.5),
    "mse": dict(method="mse"),
    "mse-cw": dict(method="mse", channel_wise=True),
    "mse-bc": dict(method="mse", bias_correction=True),
    "mse-cw-bc": dict(method="mse", channel_wise=True, bias_correction=True),
}
BURST_CANDIDATES = {
    f"mse-burst{BURST}": dict(method="mse", burst=BURST),
    f"mse-cw-burst{BURST}": dict(method="mse", channel_wise=True, burst=BURST),
    f"percentile-cw-half-burst{BURST}": dict(method="percentile", channel_wise=True, v_init_fraction=0.5,
                                             burst=BURST),
}


def _all_qcfs(graph) -> bool:
    from snnc.ops.qcfs import QCFS
    from snnc.passes._snn_builder import is_activation
    acts = [n for n in graph.graph.nodes if is_activation(graph, n)]
    return bool(acts) and all(n.op == "call_module" and isinstance(graph.get_submodule(n.target), QCFS)
                              for n in acts)


def _candidates(options: dict, T: int, table=None) -> dict:
    """The candidates with the user's options applied; duplicates (same options) dropped."""
    out, seen = {}, set()
    for name, opts in (CANDIDATES if table is None else table).items():
        if opts.get("bias_correction") and T > BIAS_CORRECTION_MAX_T and "bias_correction" not in options:
            continue
        merged = {**opts, **options}
        key = tuple(sorted((k, repr(v)) for k, v in merged.items()))
        if key not in seen:
            seen.add(key)
            out[name] = merged
    return out


def _score(snn_step, ann, x, T):
    """``(agreement %, KL(ANN || SNN))`` of the T-step SNN against the ANN on inputs ``x``."""
    from snnc.passes import unroll_timesteps
    from snnc.passes._readout_calibration import kl_to_ann
    from snnc.runtime import run
    snn = unroll_timesteps(snn_step, T)
    with torch.no_grad():
        want = torch.cat([ann(xb) for xb in x.split(SCORE_BATCH)])
        got = torch.cat([run(snn, xb) for xb in x.split(SCORE_BATCH)])
    return 100.0 * float((got.argmax(-1) == want.argmax(-1)).float().mean()), kl_to_ann(got, want)


def choose(folded, calib, T: int, options: dict):
    """``(per-step snn graph, report)`` for the best candidate at ``T`` on ``calib`` batches."""
    from snnc.passes import threshold_balance

    if _all_qcfs(folded):   # trained for conversion: its thresholds are the recipe (Bu 2022)
        opts = {"method": "qcfs", **options}
        return threshold_balance(folded, calib, **opts), {"method": "qcfs", "options": options,
                                                          "chosen_by": "QCFS activations", "T": T}
    if calib is None:
        raise SnncError("snnc.convert: choosing a recipe (method=None) needs calibration data; pass calib or "
                        "method=...")
    x = torch.cat(calib)[:SCORE_SAMPLES]
    scores = {}
    best = _best(folded, calib, x, T, options, _candidates(options, T), scores)
    if best[0] < BURST_BELOW and "burst" not in options:
        burst = _best(folded, calib, x, T, options, _candidates(options, T, BURST_CANDIDATES), scores)
        if burst is not None and burst[0] > best[0] + BURST_MARGIN:
            best = burst
    _, _, name, opts, snn = best
    readout = None
    if "readout_calibration" not in options:   # the user's True/False is already in every candidate's options
        from snnc.passes._calibration import calibration_batches
        from snnc.passes._readout_calibration import calibrate_readout
        batches = calibration_batches(calib, options.get("batch_size", 256))   # what threshold_balance sees
        readout = calibrate_readout(snn, folded, batches, opts["T_target"])
        opts = {**opts, "readout_calibration": readout["applied"]}
    report = {"method": name, "options": opts, "chosen_by": f"agreement with the ANN on {len(x)} "
              f"calibration inputs at T={T}, ties broken by KL(ANN || SNN)", "T": T, "scores": scores}
    if readout is not None:
        report["readout_calibration"] = readout
    return snn, report


def _best(folded, calib, x, T, options, candidates, scores):
    """``(agreement, kl, name, options, snn)`` of the best of ``candidates`` (scores filled in)."""
    from snnc.passes import threshold_balance
    best = None
    for name, opts in tqdm(candidates.items(), desc=f"choosing a recipe for T={T}", disable=None, leave=False):
        opts = {**opts, "T_target": options.get("T_target", T)}
        snn = threshold_balance(folded, calib, **opts)
        agree, kl = _score(snn, folded, x, T)
        scores[name] = {"agreement": round(agree, 2), "kl": float(f"{kl:.4g}")}
        if best is None or (agree, -kl) > (best[0], -best[1]):
            best = (agree, kl, name, opts, snn)
    return best
