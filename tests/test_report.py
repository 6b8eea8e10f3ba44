"""Reports: firing rates, SOP counting (checked against brute-force fan-out), energy, plots."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import snnc
from snnc.ops import IF, DirectEncoder, Readout
from snnc import report
from snnc.passes import unroll_timesteps
from snnc.report import (E_AC_PJ, E_MAC_PJ, collect, firing_rates, interleaved_seconds, plot_accuracy_vs_T,
                         read_bench_json, write_report)


def _net():
    torch.manual_seed(0)
    m = nn.Sequential(DirectEncoder(), nn.Conv2d(1, 3, 3, stride=2, padding=1), IF(v_th=0.3), nn.AvgPool2d(2),
                      nn.Flatten(), nn.Linear(3 * 2 * 2, 5), IF(v_th=0.2), nn.Linear(5, 4), Readout())
    with torch.no_grad():
        m[1].weight.abs_()
        m[5].weight.abs_()
    return m


def _fan_out_conv(conv, in_hw):
    """For each input position, how many (output position, weight) pairs it feeds: brute force."""
    kh, kw = conv.kernel_size
    (sh, sw), (ph, pw) = conv.stride, conv.padding
    H, W = in_hw
    OH, OW = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    fan = torch.zeros(H, W)
    for oy in range(OH):
        for ox in range(OW):
            for ky in range(kh):
                for kx in range(kw):
                    iy, ix = oy * sh - ph + ky, ox * sw - pw + kx
                    if 0 <= iy < H and 0 <= ix < W:
                        fan[iy, ix] += conv.out_channels
    return fan


def _step_spikes(g, x, T):
    """Brute force: the spikes of neuron layers "2" and "6" of the per-step graph, step by step."""
    snnc.reset(g)
    spikes = {"2": [], "6": []}
    hooks = [g.get_submodule(k).register_forward_hook(lambda mod, i, o, k=k: spikes[k].append(o)) for k in spikes]
    with torch.no_grad():
        for _ in range(T):
            g(x)
    for h in hooks:
        h.remove()
    snnc.reset(g)
    return torch.stack(spikes["2"]), torch.stack(spikes["6"])


def test_sops_firing_rates_and_energy_match_brute_force():
    m = _net()
    x = torch.rand(6, 1, 8, 8)
    ds = TensorDataset(x, torch.zeros(6, dtype=torch.long))
    g = snnc.trace(m, x[:1])
    T = 5
    stats = collect(g, ds, T=T, batch_size=4)
    rows = {r["layer"]: r for r in stats["layers"]}
    s2, s6 = _step_spikes(g, x, T)                                  # [T, N, 3, 4, 4], [T, N, 5]
    assert rows["2"]["firing_rate"] == pytest.approx(s2.mean().item())
    assert rows["6"]["spikes"] == pytest.approx(s6.sum().item() / 6)
    # layer 1: analog input, runs once after unrolling (hoisted encoder): dense MACs, no SOPs
    assert rows["1"]["input"] == "analog" and rows["1"]["sops"] == 0
    # 4x4 outputs, stride 2, pad 1: valid kernel rows per output row 2,3,3,3 (11), same for columns
    assert rows["1"]["macs"] == rows["1"]["ann_macs"] == 3 * 11 * 11
    # layer 5: avg-pooled spikes, one event per nonzero pooled value, 5 synapses each
    pooled = nn.functional.avg_pool2d(s2.flatten(0, 1), 2)
    assert rows["5"]["input"] == "events"
    assert rows["5"]["sops"] == pytest.approx((pooled != 0).sum().item() * 5 / 6)
    # layer 7: spikes straight into a linear: spikes * out_features
    assert rows["7"]["sops"] == pytest.approx(s6.sum().item() * 4 / 6)
    assert rows["7"]["ann_macs"] == 5 * 4
    # the brute-force conv fan-out agrees with the ones-kernel count used for conv SOPs
    conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
    mask = (torch.rand(2, 3, 7, 7) > 0.6).float()
    from snnc.report import _ones_like_layer
    assert _ones_like_layer(conv)(mask).sum().item() == (mask * _fan_out_conv(conv, (7, 7))).sum().item()
    t = stats["total"]
    assert t["energy_snn_nj"] == pytest.approx((E_AC_PJ * t["sops"] + E_MAC_PJ * t["snn_macs"]) / 1e3)
    assert t["energy_ann_nj"] == pytest.approx(E_MAC_PJ * t["ann_macs"] / 1e3)
    assert (E_AC_PJ, E_MAC_PJ) == (0.9, 4.6)


def test_write_report_and_bench_series(tmp_path):
    m = _net()
    ds = TensorDataset(torch.rand(8, 1, 8, 8), torch.arange(8) % 4)
    lines = [{"method": "p99.9", "T": T, "accuracy": 50 + T} for T in (8, 2, 4)] + [{"T": 4, "other": 1}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\nloading...\n")
    assert read_bench_json(tmp_path / "b.jsonl") == {"p99.9": [(2, 52.0), (4, 54.0), (8, 58.0)]}
    paths = write_report(snnc.trace(m, torch.zeros(1, 1, 8, 8)), ds, T=3, out_dir=tmp_path / "r",
                         bench_json=tmp_path / "b.jsonl")
    table = paths["table"].read_text()
    assert table.splitlines()[0].startswith("T=3, 8 samples, accuracy")
    assert "| 2 | snn.if |" in table and "| 5 | linear |" in table and "ratio ANN/SNN" in table
    assert json.loads(paths["json"].read_text())["T"] == 3
    for key in ("firing_rates", "accuracy_vs_T"):
        assert paths[key].read_bytes()[:4] == b"\x89PNG"
    plot_accuracy_vs_T({"a": [(1, 10.0), (2, 20.0)]}, tmp_path / "acc.png", ann_accuracy=30.0)
    assert (tmp_path / "acc.png").stat().st_size > 1000


def test_reads_the_conversion_bench_format(tmp_path):
    from snnc.report import _ann_accuracy
    rows = [{"kind": "ann", "net": "cnn", "acc": 99.5},
            {"kind": "snn", "net": "cnn", "lib": "snnc", "method": "percentile", "T": 8, "acc": 97.0},
            {"kind": "snn", "net": "cnn", "lib": "snnc", "method": "percentile", "T": 4, "acc": 80.0},
            {"kind": "snn", "net": "cnn", "lib": "spikingjelly", "method": "max", "T": 4, "acc": 20.0},
            {"kind": "hybrid", "net": "cnn", "T": 4, "epoch": 1, "acc": 90.0},
            {"kind": "check", "name": "x"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert read_bench_json(tmp_path / "c.jsonl") == {"snnc percentile": [(4, 80.0), (8, 97.0)],
                                                     "spikingjelly max": [(4, 20.0)]}
    assert _ann_accuracy(tmp_path / "c.jsonl") == 99.5


def test_firing_rates_of_the_unrolled_graph_match_the_step_by_step_spikes():
    m, x, T = _net(), torch.rand(6, 1, 8, 8), 5
    s2, s6 = _step_spikes(snnc.trace(m, x[:1]), x, T)
    g = unroll_timesteps(snnc.trace(m, x[:1]), T=T)
    rates = firing_rates(g, x)
    assert rates == pytest.approx([s2.mean().item(), s6.mean().item()])
    assert min(rates) > 0                             # both layers fire: the comparison tests something
    assert firing_rates(g, x) == rates                # state reset around the run: repeatable


class _FakeClock:
    """``report``'s clock replaced by one that only the callables ``costs`` makes advance."""

    def __init__(self, monkeypatch):
        self.now, self.calls = 0.0, []
        monkeypatch.setattr(report, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: self.now),
                                                                   "sleep": staticmethod(self.sleep)}))

    def sleep(self, seconds):   # a pause: the clock moves, as a real one would
        self.calls.append("sleep")
        self.now += seconds

    def costs(self, name, seconds):
        it = iter(seconds)

        def fn():
            self.calls.append(name)
            self.now += next(it)
        return fn


def test_interleaved_seconds_alternates_calls_and_takes_each_ones_median(monkeypatch):
    clock = _FakeClock(monkeypatch)
    costs, calls = clock.costs, clock.calls

    def sync():
        calls.append("sync")
        clock.now += 0.5                              # inside the timed span
    t = interleaved_seconds({"a": costs("a", [9, 1, 5, 3]), "b": costs("b", [9, 2, 2, 7])}, 3, sync=sync)
    assert calls == ["a", "sync", "b", "sync"] * 4   # one untimed warm-up round, then 3 interleaved rounds
    assert t == {"a": 3.5, "b": 2.5}                  # medians of 1, 5, 3 and of 2, 2, 7, plus the sync
    calls[:] = []
    t = interleaved_seconds({"a": costs("a", [9, 1, 5, 3])}, 3, pause=100.0)
    assert calls == ["a"] + ["a", "sleep"] * 3 and t == {"a": 3}   # the pauses are not timed
    clock.now, calls[:] = 0.0, []
    assert report.median_seconds(costs("c", [9, 4, 1, 2]), 3) == 2


def test_fastest_interleaves_warms_up_and_keeps_each_ones_best_call(monkeypatch):
    clock = _FakeClock(monkeypatch)
    costs, calls = clock.costs, clock.calls
    winner, best = report.fastest({"a": costs("a", [0, 4, 1, 6]), "b": costs("b", [0, 2, 3, 2])}, 3)
    assert calls == ["a", "b"] * 4                    # an untimed first call each, then 3 interleaved rounds
    assert best == {"a": 1, "b": 2} and winner == "a"  # best of 4, 1, 6 and of 2, 3, 2
    calls[:] = []
    assert report.fastest({"x": costs("x", [0, 5]), "y": costs("y", [0, 5])}, 1)[0] == "x"  # a tie: the first
