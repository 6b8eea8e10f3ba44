"""snnc.trace on models that loop over time in forward (``snnc/capture.py``): golden IR of the
rerolled step graph, numbers equal to the model's own run, and clear refusals."""
import pytest
import torch
from torch import nn

import snnc
from snnc.errors import TraceError
from snnc.ops import LIF


class _Loop(nn.Module):
    """snnc's own neurons in a per-step loop inside forward: the shape every peer's tutorial has."""

    def __init__(self, steps=5, accumulate=False):
        super().__init__()
        self.steps, self.accumulate = steps, accumulate
        self.fc1, self.lif1 = nn.Linear(6, 5), LIF(decay=0.8, v_th=0.5)
        self.fc2, self.lif2 = nn.Linear(5, 3), LIF(decay=0.9, v_th=0.5)

    def forward(self, x):
        rec, total = [], 0
        for t in range(x.shape[0]):
            s = self.lif2(self.fc2(self.lif1(self.fc1(x[t]))))
            rec.append(s)
            total = total + s
        return total if self.accumulate else torch.stack(rec)


def _net(**kw):
    torch.manual_seed(0)
    return _Loop(**kw).eval()


def test_loop_in_forward_rerolls_to_one_step_and_unrolls():
    m, x = _net(), torch.rand(5, 2, 6) * 2
    snnc.reset(m)
    with torch.no_grad():
        want = m(x)
    snnc.reset(m)
    g = snnc.trace(m, x)
    assert snnc.dump(g).splitlines() == [
        "graph(%0: f32[5,2,6]@seq) T=5 {",
        "  %1 : f32[5,2,5]@seq = nn.linear(%0) {out=5} (weight=f32[5,6], bias=f32[5])  # fc1",
        "  %2 : spike[5,2,5]@seq = snn.lif(%1) {decay=0.8, v_th=0.5, reset=subtract}  # lif1",
        "  %3 : f32[5,2,3]@seq = nn.linear(%2) {out=3} (weight=f32[3,5], bias=f32[3])  # fc2",
        "  %4 : spike[5,2,3]@seq = snn.lif(%3) {decay=0.9, v_th=0.5, reset=subtract}  # lif2",
        "  return %4", "}"]
    assert want.sum() > 3 and torch.equal(snnc.run(g, x), want)
    assert torch.equal(snnc.compile(g, "onnx")(x), want)


def test_a_loop_without_per_step_records_stays_unrolled_and_equal():
    """Summing spikes across steps inside forward is not a per-step record to reroll: the graph
    keeps the T calls of each neuron and, called once, computes what the model computes."""
    m, x = _net(accumulate=True), torch.rand(5, 2, 6) * 2
    snnc.reset(m)
    with torch.no_grad():
        want = m(x)
    g = snnc.trace(m, x)
    assert snnc.dump(g).count("snn.lif") == 10
    assert want.sum() > 0 and torch.equal(snnc.run(g, x), want)


def test_data_dependent_python_is_not_specialised_to_the_example():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lif = LIF(decay=0.5)

        def forward(self, x):
            out = []
            for t in range(x.shape[0]):
                out.append(self.lif(x[t]) if x[t].sum() > 0 else x[t])
            return torch.stack(out)

    with pytest.raises(TraceError, match="cannot trace Branchy"):
        snnc.trace(Branchy(), torch.rand(3, 2, 4))


def test_range_over_a_shape_and_tuple_unpacking_are_followed_with_real_values():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.lif = nn.Linear(4, 4), LIF(decay=0.5, v_th=0.3, output_membrane=True)

        def forward(self, x):
            spikes, mems = [], []
            for t in range(len(x)):
                s, v = self.lif(self.fc(x[t]))
                spikes.append(s)
                mems.append(v)
            return torch.stack(spikes), torch.stack(mems)

    torch.manual_seed(1)
    m, x = Net().eval(), torch.rand(4, 3, 4)
    snnc.reset(m)
    with torch.no_grad():
        s_want, v_want = m(x)
    snnc.reset(m)
    g = snnc.trace(m, x)
    s, v = snnc.run(g, x)
    # the unrolled linear runs on the [T*N] batch: float sums may round differently from [N]
    assert s_want.sum() > 2 and torch.equal(s, s_want) and torch.allclose(v, v_want, atol=1e-6)
