"""snn.burst_if (snnc.ops.BurstIF, Li & Zeng 2022): up to max_spikes spikes per step. Torch
semantics against a hand-written loop, conversion with ``burst=k`` (T*k levels in T steps), the
default's burst candidates, and the ONNX and TVM (hybrid, relax) lowerings against torch."""
import pytest
import torch
from torch import nn

import snnc
from snnc.errors import InputError
from snnc.ops import IF, BurstIF
from snnc.passes import threshold_balance, unroll_timesteps


def _reference(x_seq, v_th, k, v_init=0.0, strict=False):
    v, out = torch.full_like(x_seq[0], v_init), []
    for x in x_seq:
        h = v + x
        s = torch.zeros_like(h)
        for _ in range(k):   # one spike per whole threshold held, at most k
            more = (h - s * v_th > v_th) if strict else (h - s * v_th >= v_th)
            s = s + more.float()
        out.append(s)
        v = h - s * v_th
    return torch.stack(out)


@pytest.mark.parametrize("k,compare", [(1, ">="), (3, ">="), (3, ">")])
def test_burst_if_matches_a_hand_written_loop(k, compare):
    torch.manual_seed(0)
    x = torch.rand(7, 5, 6) * 2.5 - 0.3
    x[2, 0, :3] = torch.tensor([0.5, 1.0, 1.5])   # exact multiples of the threshold
    n = BurstIF(max_spikes=k, v_th=0.5, compare=compare, step_mode="m")
    got = n(x)
    assert torch.equal(got, _reference(x, 0.5, k, strict=compare == ">"))
    if k == 1:   # one spike per step at most: the IF neuron
        assert torch.equal(got, IF(v_th=0.5, compare=compare, step_mode="m")(x))
    else:
        assert got.max() == k


def test_burst_if_bad_arguments():
    with pytest.raises(ValueError, match="max_spikes"):
        BurstIF(max_spikes=0)
    with pytest.raises(ValueError, match="reset"):
        BurstIF(max_spikes=2, reset="zero")


def _ann():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                         nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).eval()


def test_conversion_with_burst_spikes_is_closer_to_the_ann_at_small_T():
    ann, x = _ann(), torch.rand(64, 1, 4, 4)
    g = snnc.trace(ann, x[:2])
    want = ann(x).detach()
    errs = {}
    for burst in (1, 4):
        snn = threshold_balance(g, x, method="mse", T_target=4, burst=burst)
        ifs = [m for m in snn.modules() if isinstance(m, IF)]
        assert all(isinstance(m, BurstIF) == (burst > 1) for m in ifs) and len(ifs) == 3
        errs[burst] = (snnc.run(unroll_timesteps(snn, 4), x) - want).pow(2).mean().item()
    assert errs[4] < 0.5 * errs[1], errs
    assert "snn.burst_if" in snnc.dump(threshold_balance(g, x, method="mse", burst=2))
    with pytest.raises(InputError, match="burst"):
        threshold_balance(g, x, burst=0)


def test_default_tries_burst_only_when_binary_spikes_fall_short(monkeypatch):
    import snnc._recipe_search as rs
    ann, x = _ann(), torch.rand(64, 1, 4, 4)
    g = snnc.convert(ann, x, T=4)
    if g.snnc_conversion["scores"][g.snnc_conversion["method"]]["agreement"] >= rs.BURST_BELOW:
        assert not any("burst" in k for k in g.snnc_conversion["scores"])
    monkeypatch.setattr(rs, "BURST_BELOW", 101.0)   # binary never good enough: burst is tried
    monkeypatch.setattr(rs, "BURST_MARGIN", -101.0)  # and wins whatever it scores
    g = snnc.convert(ann, x, T=4)
    assert g.snnc_conversion["method"].endswith("burst4")
    assert any(isinstance(m, BurstIF) for m in g.modules())
    g = snnc.convert(ann, x, T=4, burst=1)   # the user forbids bursts
    assert not any("burst" in k for k in g.snnc_conversion["scores"])


def _burst_graph(T=5):
    ann, x = _ann(), torch.rand(64, 1, 4, 4)
    snn = threshold_balance(snnc.trace(ann, x[:2]), x, method="mse", channel_wise=True, T_target=T, burst=3)
    return unroll_timesteps(snn, T), x[:2]


def test_burst_graph_runs_on_onnx():
    pytest.importorskip("onnxruntime")
    g, x = _burst_graph()
    assert torch.allclose(snnc.compile(g, target="onnx")(x), snnc.run(g, x), atol=1e-5)


@pytest.mark.parametrize("mode", ["hybrid", pytest.param("relax", marks=pytest.mark.slow)])
def test_burst_graph_runs_on_tvm_llvm(mode):
    pytest.importorskip("tvm")
    g, x = _burst_graph()
    counts = []
    h = [m.register_forward_hook(lambda _m, _a, out: counts.append(out.max().item()))
         for m in g.modules() if isinstance(m, BurstIF)]
    want = snnc.run(g, x)
    for hk in h:
        hk.remove()
    assert max(counts) > 1   # some neuron bursts, so the kernel's count rule is exercised
    assert torch.allclose(snnc.compile(g, target="tvm:llvm", mode=mode)(x), want, atol=1e-5)
