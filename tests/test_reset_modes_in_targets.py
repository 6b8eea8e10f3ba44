"""snntorch's reset order (reset="subtract_after_leak") is one semantics of the IR: the targets
that do not implement it refuse it by name instead of running another reset."""
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


def test_tvm_refuses_subtract_after_leak(graph):
    pytest.importorskip("tvm")
    with pytest.raises(UnsupportedOp, match=r"node %_1 .*reset='subtract_after_leak'"):
        snnc.compile(graph, target="tvm:llvm")


def test_quantize_integer_refuses_subtract_after_leak(graph):
    with pytest.raises(UnsupportedOp, match=r"node %_1 .*reset='subtract_after_leak' has no integer form"):
        quantize_integer(graph)


def test_onnx_runs_subtract_after_leak_exactly(graph):
    x = torch.rand(3, 2, 4) * 3
    m = snnc.compile(graph, target="onnx")
    assert torch.equal(m(x), snnc.run(graph, x))
