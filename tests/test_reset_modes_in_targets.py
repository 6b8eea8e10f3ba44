"""snntorch's reset order (reset="subtract_after_leak") is one semantics of the IR: the float
targets run it bit-exactly against the reference; the integer IR refuses it by name."""
import pytest
import torch
from torch import nn

import snnc
from snnc.errors import UnsupportedOp
from snnc.ops import LIF
from snnc.passes import quantize_integer, unroll_timesteps


@pytest.fixture
def graph():
    net = nn.Sequential(nn.Linear(4, 3), LIF(decay=0.5, reset="subtract_after_leak"))
    return unroll_timesteps(snnc.trace(net, torch.zeros(2, 4)), T=3)


@pytest.mark.parametrize("mode", ["relax", "hybrid"])
@pytest.mark.parametrize("threshold", [0.7, "per-channel"])
def test_tvm_runs_subtract_after_leak_exactly(mode, threshold):
    pytest.importorskip("tvm")
    snntorch = pytest.importorskip("snntorch")
    torch.manual_seed(0)
    v_th = torch.tensor([0.5, 0.8, 1.1]) if threshold == "per-channel" else threshold
    net = nn.Sequential(nn.Linear(4, 3), LIF(decay=0.9, reset="subtract_after_leak", v_th=v_th))
    net[0].weight.data.abs_()   # every neuron fires, some of the time
    g = unroll_timesteps(snnc.trace(net, torch.zeros(2, 4)), T=12)
    x = torch.rand(12, 2, 4) * 2
    ref = snnc.run(g, x)
    assert 0 < ref.mean() < 1
    assert torch.equal(snnc.compile(g, target="tvm:llvm", mode=mode)(x), ref)
    if threshold != "per-channel":   # snntorch's own Leaky agrees with the reference
        leaky = snntorch.Leaky(beta=0.9, threshold=0.7, reset_mechanism="subtract", init_hidden=False)
        mem = torch.zeros(2, 3)
        outs = []
        for t in range(12):
            spk, mem = leaky(net[0](x[t]), mem)
            outs.append(spk)
        assert torch.equal(torch.stack(outs), ref)


def test_quantize_integer_refuses_subtract_after_leak(graph):
    with pytest.raises(UnsupportedOp, match=r"node %_1 .*reset='subtract_after_leak' has no integer form"):
        quantize_integer(graph)


def test_onnx_runs_subtract_after_leak_exactly(graph):
    x = torch.rand(3, 2, 4) * 3
    m = snnc.compile(graph, target="onnx")
    assert torch.equal(m(x), snnc.run(graph, x))
