"""bench/conversion.py --seeds: the statistics over ANNs (bench/_seeds.py) checked against numpy on
made-up accuracies, and one end-to-end run of the bench on two tiny ANNs (slow)."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


seeds = _load("_seeds")


def test_paired_difference_and_its_standard_error_match_numpy():
    ours, peer = [98.0, 99.11, 98.0, 98.89, 95.78], [98.67, 98.22, 98.0, 97.56, 96.22]
    d = np.subtract(ours, peer)
    m, se = seeds.paired(ours, peer)
    assert m == pytest.approx(d.mean()) and se == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)))
    assert seeds.mean_std([97.0]) == (97.0, 0.0)
    with pytest.raises(ValueError):   # unpaired lists are a bug in the caller, not a shorter mean
        seeds.paired([1.0, 2.0], [1.0])


def test_summaries_take_the_per_seed_best_peer_recipe_and_check_the_means():
    per_seed = {("cnn", "snnc", "default", 2): {0: 98.0, 1: 99.0, 2: 97.0},
                ("cnn", "spikingjelly", "a", 2): {0: 99.0, 1: 90.0, 2: 96.0},
                ("cnn", "spikingjelly", "b", 2): {0: 97.0, 1: 98.0, 2: 96.5},
                ("vgg", "spikingjelly", "a", 2): {0: 0.0, 1: 0.0, 2: 0.0}}   # another net: ignored
    ann = {("cnn", s): 99.0 for s in range(3)}
    row, check = seeds.summaries(per_seed, ann, "cnn", (2,))
    assert row["spikingjelly_best"] == [99.0, 98.0, 96.5] and row["spikingjelly_best_methods"] == ["a", "b", "b"]
    assert row["spikingjelly_best_recipe_on_mean"] == "b"            # 97.17 vs a's 95.0
    d = np.array([98.0, 99.0, 97.0]) - np.array([99.0, 98.0, 96.5])
    assert row["diff_mean"] == round(d.mean(), 3) and row["diff_se"] == round(d.std(ddof=1) / np.sqrt(3), 3)
    f = np.array([98.0, 99.0, 97.0]) - np.array([97.0, 98.0, 96.5])          # against recipe b on all seeds
    assert row["diff_vs_recipe_on_mean"] == round(f.mean(), 3)
    assert row["diff_vs_recipe_on_mean_se"] == round(f.std(ddof=1) / np.sqrt(3), 3)
    assert row["snnc_std"] == round(np.std([98.0, 99.0, 97.0], ddof=1), 2)
    assert row["wins_ties_losses"] == [2, 0, 1]
    assert check["kind"] == "check" and check["snnc"] == 98.0 and check["spikingjelly"] == 97.83 and check["ok"]
    per_seed[("cnn", "snnc", "default", 2)][1] = 97.0                    # now behind on the mean
    assert not seeds.summaries(per_seed, ann, "cnn", (2,))[1]["ok"]


@pytest.mark.slow
def test_bench_seed_run_end_to_end(tmp_path, monkeypatch, capsys):
    pytest.importorskip("spikingjelly")
    monkeypatch.syspath_prepend(str(BENCH))
    conv = _load("conversion")
    monkeypatch.setattr(conv, "CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(conv.NETS, "cnn", (conv.NETS["cnn"][0], 2))          # 2 epochs: a weak but real ANN
    conv.main(["--seeds", "2", "--nets", "cnn", "--plot", str(tmp_path / "s.png")])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    anns = [r for r in rows if r["kind"] == "ann"]
    assert [r["seed"] for r in anns] == [0, 1] and anns[0]["acc"] != anns[1]["acc"]   # two different ANNs
    summary = {r["T"]: r for r in rows if r["kind"] == "seeds"}
    assert sorted(summary) == [2, 4, 8]
    for T, r in summary.items():   # the summary is made of the per-seed lines printed in the same run
        mine = [x["acc"] for x in rows if x["kind"] == "snn_seed" and x["lib"] == "snnc" and x["T"] == T]
        peer = [max(x["acc"] for x in rows if x["kind"] == "snn_seed" and x["lib"] == "spikingjelly"
                    and x["T"] == T and x["seed"] == s) for s in (0, 1)]
        assert r["snnc_default"] == mine and r["spikingjelly_best"] == peer
    assert sum(r["kind"] == "check" for r in rows) == 3
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
