"""One int8 weight digit for spike convs (``tvm:llvm``'s ``spike_digits``, targets/spike_digits.py):
the rounding's stated properties and bound against float64 on random 0/1 inputs, the data-driven
rounding against round-to-nearest on held-out inputs, the per-layer choice by measured agreement,
the fused one-digit kernel against the rounded graph's reference, the export at another batch size,
and the errors for bad options."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snnc
from snnc.errors import SnncError
from snnc.targets import spike_digits
from snnc.targets.spike_conv import int8_isa
from snnc.targets.spike_fused import FUSED_ISAS
from snnc.targets.tvm_hybrid import apply_conv_choices, spike_report

sys.path.insert(0, os.path.dirname(__file__))
from test_spike_kernels import firing_case  # noqa: E402  (bench net, weights scaled so every layer fires)

pytest.importorskip("tvm")
pytestmark = pytest.mark.usefixtures("isolated_cache")
fused_host = pytest.mark.skipif(int8_isa() not in FUSED_ISAS,
                                reason="the one-digit kernel is the fused runner's: VNNI hosts without AMX")


def _weights(seed=0):
    torch.manual_seed(seed)
    return torch.randn(16, 8, 3, 3) * torch.linspace(0.01, 2.0, 16).view(-1, 1, 1, 1)


def test_balanced_rounding_keeps_each_window_sum_and_every_weight_within_a_step():
    w = _weights()
    q, s, bound = spike_digits.one_digit(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    u = w.double() / s.double().view(-1, 1, 1, 1)
    res = u - q.double()
    assert float(res.abs().max()) <= 1.0 + 1e-9
    assert float(res.sum((2, 3)).abs().max()) <= 0.5 + 1e-9          # per (out, in channel) window
    near = u - torch.round(u)                                       # round-to-nearest does not have it
    assert float(near.sum((2, 3)).abs().max()) > 0.5


def test_one_digit_bound_holds_for_random_spikes_in_float64():
    w = _weights(1)
    q, s, bound = spike_digits.one_digit(w)
    wq = q.double() * s.double().view(-1, 1, 1, 1)
    torch.manual_seed(2)
    worst = 0.0
    for rate in (0.1, 0.5, 0.9):
        x = (torch.rand(8, 8, 10, 10) < rate).double()
        err = (F.conv2d(x, w.double(), padding=1) - F.conv2d(x, wq, padding=1)).abs().amax((0, 2, 3))
        assert bool((err <= bound.double() + 1e-9).all())
        worst = max(worst, float((err / bound.double()).max()))
    assert worst > 0.1   # the bound is not vacuous: real inputs come within 10x of it


def test_data_driven_rounding_lowers_the_error_on_held_out_spikes():
    torch.manual_seed(3)
    conv = nn.Conv2d(8, 16, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(_weights(3))
    # correlated spikes: channel rates differ and neighbouring pixels agree (as a neuron layer's do)
    rates = torch.rand(1, 8, 1, 1) * 0.6
    blobs = lambda n: (F.avg_pool2d(torch.rand(n, 8, 12, 12), 3, 1, 1) < rates + 0.2).float()  # noqa: E731
    calib, held_out = blobs(32), blobs(32)
    q0, s0, _ = spike_digits.one_digit(conv.weight)
    q1, s1, _ = spike_digits.one_digit(conv.weight, conv, calib)
    exact = F.conv2d(held_out.double(), conv.weight.detach().double(), padding=1)

    def mse(q, s):
        wq = q.double() * s.double().view(-1, 1, 1, 1)
        return float(((F.conv2d(held_out.double(), wq, padding=1) - exact) ** 2).mean())
    nearest = torch.round(conv.weight.detach().double() / s0.double().view(-1, 1, 1, 1)).clamp(-127, 127)
    assert mse(q1, s1) < 0.8 * mse(nearest, s0)
    assert mse(q1, s1) < mse(q0, s0)


def test_bad_digit_options_are_refused_naming_the_argument():
    g, x = firing_case()
    with pytest.raises(SnncError, match="spike_digits=3"):
        snnc.compile(g, target="tvm:llvm", spike_digits=3, cache=False)
    if int8_isa() is not None:
        with pytest.raises(SnncError, match="calib="):
            snnc.compile(g, target="tvm:llvm", spike_digits="auto", cache=False)
    with pytest.raises(SnncError, match="calib must be"):
        snnc.compile(g, target="tvm:llvm", spike_digits="auto", calib=[1, 2], cache=False)


@fused_host
def test_one_digit_kernel_computes_the_rounded_graph_and_exports_it():
    g, x = firing_case()
    m = snnc.compile(g, target="tvm:llvm", spike_digits=1, cache=False)
    report = m.meta["spike_digits"]
    assert report and all(r["digits"] == 1 and r["error_bound"] > 0 for r in report.values())
    apply_conv_choices(m._hybrid, {"conv_0": "fused", "conv_2": "fused", "conv_4": "fused"})
    assert [row["digits"] for row in spike_report(m._hybrid).values()] == [1, 1]
    # the reference: the same graph with the same rounded weights, run by snnc's interpreter
    rounded = spike_digits._with_weights(g, spike_digits._rounded(g, list(report)))
    ref = snnc.run(rounded, x)
    assert 0.05 < float(ref.mean()) < 0.6
    assert float((m(x) == ref).float().mean()) >= 0.9999
    other = torch.rand(4, 5, 3, 16, 16) * 2    # the exported library, another batch size
    path = os.path.join(os.environ["SNNC_CACHE_DIR"], "one_digit.so")
    m.export(path)
    loaded = snnc.load(path)
    assert loaded.meta["spike_digits"] == report   # the export says what it computes
    assert float((loaded(other) == m(other)).float().mean()) >= 0.9999


@fused_host
def test_auto_keeps_one_digit_only_where_measured_agreement_holds():
    g, x = firing_case()
    torch.manual_seed(5)
    calib = torch.rand(4, 6, 3, 16, 16) * 2
    m = snnc.compile(g, target="tvm:llvm", spike_digits="auto", calib=calib, min_agreement=0.999, cache=False)
    report = m.meta["spike_digits"]
    assert set(report) == {n.target for n in spike_digits.candidates(g)}
    for r in report.values():
        assert (r["digits"] == 1) == (r["agreement"] >= 0.999)
    ref = snnc.run(g, x)   # held-out input, against the fp32 graph
    assert float((m(x) == ref).float().mean()) >= 0.998
    strict = snnc.compile(g, target="tvm:llvm", spike_digits="auto", calib=calib, min_agreement=1.0, cache=False)
    assert all(r["digits"] == 2 or r["agreement"] == 1.0 for r in strict.meta["spike_digits"].values())
