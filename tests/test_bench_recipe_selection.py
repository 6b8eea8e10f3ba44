"""bench/recipe_selection.py (which label-free signal picks the conversion recipe) and the ANN cache of
bench/conversion.py: Kendall's tau against hand-counted pairs, the rules' picks and paired differences
against numpy on made-up rows, one candidate's accuracy against ``snnc.convert`` itself, and a cached
ANN that is the same whatever ran before it in the process."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))

    def load(name):
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


def test_kendall_tau_counts_concordant_pairs_and_ignores_ties(bench):
    rs = bench("recipe_selection")
    assert rs.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)   # 5 concordant, 1 discordant
    assert rs.kendall_tau([1, 1, 2], [1, 2, 3]) == pytest.approx(2 / np.sqrt(2 * 3))   # tau-b: one tie in a
    assert rs.kendall_tau([3, 2, 1], [1, 2, 3]) == pytest.approx(-1.0)
    assert np.isnan(rs.kendall_tau([1, 1, 1], [1, 2, 3]))


def _row(seed, cand, acc, agree, kl, off=None):
    r = dict(kind="candidate", net="cnn", seed=seed, T=8, cand=cand, acc=acc,
             acc_readout_off=acc if off is None else off)
    for k in ("calib", "mix", "noisy", "test"):
        r.update({f"agree_{k}": agree, f"kl_{k}": kl, f"mse_{k}": kl})
    return r


def test_rules_pick_by_their_key_and_report_the_paired_difference(bench):
    rs = bench("recipe_selection")
    cands = [_row(0, "mse", 98.0, 100.0, 0.002), _row(0, "mse-cw", 99.0, 100.0, 0.001, off=98.5),
             _row(0, "max-half", 99.5, 100.0, 0.0005),            # an EXTRA candidate: only in "+max-half" rules
             _row(1, "mse", 97.0, 99.0, 0.001), _row(1, "mse-cw", 96.0, 100.0, 0.003),
             _row(1, "max-half", 98.0, 98.0, 0.0001)]
    sj = [dict(net="cnn", T=8, seed=s, acc=a) for s, a in ((0, 98.5), (0, 99.5), (1, 96.5))]
    out = rs.summaries(cands, sj)
    rules = {r["rule"]: r for r in out if r["kind"] == "rule"}
    d = rules["the default's rule: agree_calib, kl_calib"]
    assert d["picks"] == ["mse-cw", "mse-cw"] and d["snnc_mean"] == 97.5   # seed 1: agreement beats KL
    diffs = np.array([99.0, 96.0]) - np.array([99.5, 96.5])
    assert d["diff_vs_sj_best"] == round(diffs.mean(), 3) and d["diff_se"] == round(diffs.std(ddof=1) / np.sqrt(2), 3)
    assert rules["the default's rule, readout not refitted"]["snnc_mean"] == (98.5 + 96.0) / 2
    assert rules["+max-half: agree_calib, kl_calib"]["picks"] == ["max-half", "mse-cw"]
    assert rules["oracle: acc (test labels, as sj best)"]["picks"] == ["max-half", "max-half"]
    taus = {r["signal"]: r["kendall_tau"] for r in out if r["kind"] == "signal"}
    # seed 0: KL ranks max-half < mse-cw < mse as acc does (tau 1); seed 1: mse-cw, mse, max-half by KL,
    # acc 96 < 97 < 98 the same way (tau 1); agreement ties on seed 0 (nan, left out) and on seed 1
    # orders max-half < mse < mse-cw, every pair against acc (tau -1)
    assert taus["kl_calib"] == 1.0 and taus["agree_calib"] == -1.0


def test_probe_inputs_stay_in_the_input_range_and_mix_pairs(bench):
    rs = bench("recipe_selection")
    calib = torch.rand(64, 1, 8, 8)
    p = rs.probe_inputs(calib)
    assert p["mix"].shape == calib.shape and p["noisy"].shape == calib.shape
    assert float(p["noisy"].min()) >= float(calib.min()) and float(p["noisy"].max()) <= float(calib.max())
    assert torch.equal(rs.probe_inputs(calib)["mix"], p["mix"])            # deterministic
    assert not torch.equal(p["mix"], calib)


def _tiny_nets(conv, monkeypatch, tmp_path):
    from snnc.zoo import digits_cnn
    monkeypatch.setattr(conv, "CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(conv.NETS, "cnn", (lambda: digits_cnn(4), 1))          # 1 epoch: a weak but real ANN


def test_cached_ann_does_not_depend_on_what_ran_before(bench, monkeypatch, tmp_path):
    """Seed 0 used to build the net unseeded: a fresh cache gave another ANN after other RNG use."""
    from snnc.data import digits
    conv = bench("conversion")
    _tiny_nets(conv, monkeypatch, tmp_path)
    data = digits()
    first, _ = conv.trained("cnn", data, 1, seed=0)
    for f in (tmp_path / "cache").iterdir():
        f.unlink()
    torch.rand(1000)   # other work in the same process moves the global generator
    again, seconds = conv.trained("cnn", data, 1, seed=0)
    assert seconds > 0   # trained again, not loaded
    a, b = first.state_dict(), again.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other, _ = conv.trained("cnn", data, 1, seed=1)
    key = next(iter(a))
    assert not torch.equal(other.state_dict()[key], a[key])


def test_candidate_accuracy_is_what_snnc_convert_gives_with_that_recipe(bench, monkeypatch, tmp_path):
    import snnc
    from snnc._recipe_search import CANDIDATES
    from snnc.data import digits
    from snnc.demo import accuracy
    conv, rs = bench("conversion"), bench("recipe_selection")
    _tiny_nets(conv, monkeypatch, tmp_path)
    monkeypatch.setattr(rs, "Ts", (2,))
    data = digits()
    ann, _ = conv.trained("cnn", data, 1, seed=0)
    calib = data.x_train[:64]
    rows = {r["cand"]: r for r in rs.candidate_rows("cnn", 0, ann, data, calib)}
    for cand in ("mse-cw", "max-half"):
        opts = {**CANDIDATES, **rs.EXTRA}[cand]
        g = snnc.convert(ann, calib, T=2, readout_calibration=True, **opts)
        assert rows[cand]["acc"] == round(accuracy(lambda x: snnc.run(g, x), data.x_test, data.y_test), 2)
    r = rows["mse-cw"]
    assert 0.0 <= r["agree_mix"] <= 100.0 and r["kl_test"] >= 0.0 and r["readout_applied"] in (True, False)
