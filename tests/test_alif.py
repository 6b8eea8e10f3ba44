"""ALIF (adaptive-threshold LIF, two state variables): one file in snnc/ops, and every float target
runs it bit-exactly against the reference."""
import pytest
import torch
from torch import nn

import snnc
from snnc.ops import ALIF, LIF
from snnc.passes import insert_surrogate, unroll_timesteps


def _equations(x, decay, v_th, rho, beta, reset="subtract", v_reset=0.0):
    """Bellec 2018's update written out independently of snnc (the spec in alif.py)."""
    v = torch.zeros_like(x[0])
    a = torch.zeros_like(x[0])
    s_prev = torch.zeros_like(x[0])
    out = []
    for t in range(x.shape[0]):
        a = rho * a + s_prev
        b = v_th + beta * a
        h = decay * v + x[t]
        s = (h - b >= 0).float()
        v = h - b * s if reset == "subtract" else h * (1 - s) + v_reset * s
        s_prev = s
        out.append(s)
    return torch.stack(out)


def _net(reset="subtract"):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), ALIF(tau=4.0, rho=0.8, beta=0.3, reset=reset))
    net[0].weight.data.abs_()   # every neuron fires, the adaptation has something to do
    return net


def test_reference_follows_the_equations_and_adapts():
    x = torch.rand(30, 4, 5) * 1.5
    s = ALIF(decay=0.75, rho=0.9, beta=0.5, step_mode="m")(x)
    assert torch.allclose(s, _equations(x, 0.75, 1.0, 0.9, 0.5))
    lif = LIF(decay=0.75, step_mode="m")(x)
    assert 0 < s.sum() < lif.sum()            # the raised threshold costs spikes
    assert torch.equal(ALIF(decay=0.75, beta=0.0, step_mode="m")(x), lif)   # beta=0 is a LIF


def test_single_step_carries_both_state_variables():
    x = torch.rand(12, 3, 4) * 2
    multi = ALIF(step_mode="m", rho=0.7, beta=0.4)(x)
    n = ALIF(rho=0.7, beta=0.4)
    steps = torch.stack([n(x[t]) for t in range(12)])
    assert torch.equal(steps, multi)
    v, a = n.v
    assert v.shape == a.shape == (3, 4) and a.max() > 0
    snnc.reset(n)
    assert n.v is None


def test_golden_ir_and_record():
    g = unroll_timesteps(snnc.trace(_net(), torch.zeros(3, 8)), T=5)
    assert "= snn.alif(%1) {tau=4, v_th=1, reset=subtract, rho=0.8, beta=0.3}  # 1" in snnc.dump(g)
    rec = snnc.ops.registry.record("snn.alif")
    assert rec.state == ("v", "a") and rec.spiking == "yes"
    assert {"onnx", "tvm"} <= set(rec.hooks)


@pytest.mark.parametrize("reset", ["subtract", "zero"])
@pytest.mark.parametrize("target", ["onnx", "onnx:scan", "tvm:relax", "tvm:hybrid"])
def test_targets_match_reference_bit_exactly(target, reset):
    if target.startswith("tvm"):
        pytest.importorskip("tvm")
    g = unroll_timesteps(snnc.trace(_net(reset), torch.zeros(3, 8)), T=20)
    x = torch.rand(20, 3, 8)
    ref = snnc.run(g, x)
    assert 0.05 < ref.mean() < 0.9
    if target.startswith("onnx"):   # the loop over T unrolled, or one ONNX Scan carrying (v, a)
        m = snnc.compile(g, target="onnx", loop="scan" if target.endswith("scan") else "unroll")
    else:
        m = snnc.compile(g, target="tvm:llvm", mode=target.split(":")[1])
    assert torch.equal(m(x), ref)


def test_per_step_graph_runs_over_time_like_the_unrolled_one():
    net = _net()
    g = snnc.trace(net, torch.zeros(3, 8))
    x = torch.rand(20, 3, 8)
    assert torch.equal(snnc.run(g, x, T=20), snnc.run(unroll_timesteps(g, T=20), x))


def test_trains_through_a_surrogate():
    g = insert_surrogate(unroll_timesteps(snnc.trace(_net(), torch.zeros(3, 8)), T=10), kind="atan")
    x = torch.rand(10, 3, 8)
    g(x).sum().backward()
    w = g.get_submodule("0").weight.grad
    assert w is not None and w.abs().sum() > 0


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="rho=1.5"):
        ALIF(rho=1.5)
    with pytest.raises(ValueError, match="subtract_after_leak"):
        ALIF(reset="subtract_after_leak")


def test_exported_tvm_library_runs_alif_without_the_model(tmp_path):
    pytest.importorskip("tvm")
    g = unroll_timesteps(snnc.trace(_net(), torch.zeros(3, 8)), T=10)
    x = torch.rand(10, 3, 8)
    path = snnc.compile(g, target="tvm:llvm", mode="relax").export(tmp_path / "alif.so")
    assert torch.equal(snnc.load(path)(x), snnc.run(g, x))
