"""Tracing ANNs and SNNs gives golden IR dumps, metadata on every node, and clear errors."""
import pytest
import torch
from torch import nn

import snnc
from snnc.errors import TraceError, VerifyError
from snnc.ir import info
from snnc.ops import IF, DirectEncoder, Readout

GOLDEN_ANN = """\
graph(%0: f32[2,1,8,8]) {
  %1 : f32[2,4,8,8] = nn.conv2d(%0) {out=4, kernel=3, stride=1, pad=1} (weight=f32[4,1,3,3], bias=f32[4])  # conv
  %2 : f32[2,4,8,8] = nn.batch_norm(%1) {eps=1e-05} (weight=f32[4], bias=f32[4])  # bn
  %3 : f32[2,4,8,8] = nn.relu(%2)  # relu
  %4 : f32[2,4,4,4] = nn.max_pool2d(%3) {kernel=2, stride=2, pad=0}  # pool
  %5 : f32[2,4,4,4] = add(%4, %4)
  %6 : f32[2,64] = flatten(%5, 1)
  %7 : f32[2,64] = nn.dropout(%6) {p=0.5}  # drop
  %8 : f32[2,10] = nn.linear(%7) {out=10} (weight=f32[10,64], bias=f32[10])  # fc
  return %8
}
"""

GOLDEN_SNN = """\
graph(%0: f32[2,4]) {
  %1 : f32[2,4] = snn.direct_encoder(%0)  # enc
  %2 : f32[2,3] = nn.linear(%1) {out=3} (weight=f32[3,4], bias=f32[3])  # fc1
  %3 : spike[2,3] = snn.if(%2) {v_th=0.5, reset=subtract}  # if1
  %4 : f32[2,2] = nn.linear(%3) {out=2} (weight=f32[2,3], bias=f32[2])  # fc2
  %5 : f32[2,2] = snn.readout(%4) {mode=membrane}  # out
  return %5
}
"""


class TinyANN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.pool, self.drop, self.fc = nn.MaxPool2d(2), nn.Dropout(0.5), nn.Linear(64, 10)

    def forward(self, x):
        y = self.pool(self.relu(self.bn(self.conv(x))))
        return self.fc(self.drop(torch.flatten(y + y, 1)))


class TinySNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.fc1, self.if1 = DirectEncoder(), nn.Linear(4, 3), IF(v_th=0.5)
        self.fc2, self.out = nn.Linear(3, 2), Readout()

    def forward(self, x):
        return self.out(self.fc2(self.if1(self.fc1(self.enc(x)))))


def test_ann_golden_dump_and_meta():
    g = snnc.trace(TinyANN(), torch.zeros(2, 1, 8, 8))
    assert snnc.dump(g) == GOLDEN_ANN
    for n in g.graph.nodes:
        if n.op != "output":
            i = info(n)
            assert i.dtype == torch.float32 and i.layout == "step" and not i.spiking


def test_snn_golden_dump_and_spiking_meta():
    g = snnc.trace(TinySNN(), torch.zeros(2, 4))
    assert snnc.dump(g) == GOLDEN_SNN
    spiking = {n.name: info(n).spiking for n in g.graph.nodes if info(n) is not None}
    assert spiking["if1"] and not spiking["fc2"]


def test_trace_does_not_modify_model_and_matches_outputs():
    model = TinyANN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = snnc.trace(model, torch.zeros(2, 1, 8, 8))
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(g(x), model(x))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_untraceable_model_names_module():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.inner = nn.Linear(3, 3), Branchy()

        def forward(self, x):
            return self.inner(self.fc(x))

    with pytest.raises(TraceError, match="inner"):
        snnc.trace(Outer(), torch.zeros(1, 3))


def test_unknown_op_is_named():
    model = nn.Sequential(nn.Linear(3, 3), nn.Softmax(dim=1))
    with pytest.raises(VerifyError, match=r"node %_1 .*Softmax.*supported: .*snn.lif"):
        snnc.trace(model, torch.zeros(1, 3))


def test_shape_error_names_node():
    with pytest.raises(VerifyError, match="node %_1"):
        snnc.trace(nn.Sequential(nn.Linear(3, 3), nn.Linear(4, 2)), torch.zeros(1, 3))


def test_trace_rejects_non_tensor_inputs():
    with pytest.raises(TraceError, match="example_inputs\\[0\\]"):
        snnc.trace(nn.Linear(2, 2), [[1.0, 2.0]])
