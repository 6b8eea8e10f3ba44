"""NeuNorm (Wu 2019): hand-computed update, single-step = multi-step, unrolled graph = per-step
reference, and it trains."""
import pytest
import torch
from torch import nn

import snnc
from snnc.ops import LIF, DirectEncoder, NeuNorm, Readout
from snnc.passes import insert_surrogate, unroll_timesteps


# tiny tensors: one thread avoids thread-pool sync costs on a shared CPU
pytestmark = pytest.mark.usefixtures("one_thread")


def test_hand_computed_auxiliary_neuron():
    nn_ = NeuNorm(2, 1, 1, k=0.5, step_mode="m")
    nn_.w.data.fill_(2.0)
    o = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]).view(3, 1, 2, 1, 1)   # [T, N, C, H, W]
    # A = 0.5*A + 0.5/4 * sum_c o: 0.25, 0.125+0.125=0.25, 0.125 ; Y = o - 2*A
    expected = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [-0.25, -0.25]]).view(3, 1, 2, 1, 1)
    torch.testing.assert_close(nn_(o), expected)


def test_single_and_multi_step_agree():
    op = NeuNorm(3, 4, 4, shared_across_channels=True)
    x = (torch.rand(5, 2, 3, 4, 4) > 0.5).float()
    op.step_mode = "m"
    multi = op(x)
    op.step_mode = "s"
    snnc.reset(op)
    single = torch.stack([op(x[t]) for t in range(5)])
    assert torch.equal(multi, single)


def test_unrolled_graph_equals_reference_and_trains():
    net = nn.Sequential(DirectEncoder(), nn.Conv2d(1, 3, 3, padding=1), LIF(tau=2.0, v_th=0.3),
                        NeuNorm(3, 6, 6), nn.Conv2d(3, 3, 3, padding=1), LIF(tau=2.0, v_th=0.3),
                        nn.Flatten(), nn.Linear(108, 2), Readout())
    g = snnc.trace(net, torch.zeros(2, 1, 6, 6))
    u = unroll_timesteps(g, T=4)
    assert "snn.neunorm(%3) {k=0.9, shared=false} (w=f32[3,6,6])" in snnc.dump(u)
    x = torch.rand(2, 1, 6, 6) * 2
    # the final Linear runs on [T*N, ...] after unrolling and on [N, ...] per step: BLAS may block
    # the two batch sizes differently (seen: 1e-8 apart on an AVX-512 host), so rounding, not bits
    torch.testing.assert_close(snnc.run(u, x), snnc.run(g, x, T=4), rtol=0, atol=1e-6)
    t = insert_surrogate(u, kind="atan")
    t(x).sum().backward()
    assert t.get_submodule("3").w.grad.abs().sum() > 0
