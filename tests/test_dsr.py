"""DSR (Meng 2022): representation error bound, representation-based backward against the
formulas, trainable threshold, and the 'dsr' surrogate on plain neurons."""
import pytest
import torch
from torch import nn

import snnc
from snnc.ops import DSRIF, DSRLIF, IF, LIF, DirectEncoder, Readout
from snnc.ops.surrogate import make_surrogate
from snnc.passes import insert_surrogate, unroll_timesteps


# tiny tensors: one thread avoids thread-pool sync costs on a shared CPU
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("T", [4, 8, 16])
def test_alpha_half_halves_the_representation_error_bound(T):
    vth = 1.5
    x = torch.rand(T, 4000) * vth                        # inputs in [0, v_th]
    target = x.mean(0)                                   # clamp(mean x, 0, v_th)
    errors = {}
    for alpha in (1.0, 0.5):
        r = DSRIF(v_th=vth, alpha=alpha, step_mode="m")(x).mean(0)
        errors[alpha] = (r - target).abs().max().item()
    assert errors[0.5] <= vth / (2 * T) + 1e-5
    assert errors[1.0] <= vth / T + 1e-5
    assert errors[1.0] > vth / (2 * T)                  # the bound halves, not just the observed error


def test_dsr_if_backward_is_the_representation_gradient():
    T, vth = 5, 0.8
    neuron = DSRIF(v_th=vth, alpha=0.5, step_mode="m")
    x = (torch.rand(T, 64) * 1.6 - 0.4).requires_grad_()
    gy = torch.randn(T, 64)
    neuron(x).backward(gy)
    G, xbar = gy.sum(0), x.detach().mean(0)
    inside = ((xbar >= 0) & (xbar <= vth)).float()
    torch.testing.assert_close(x.grad, (G * inside / T).expand(T, -1))
    torch.testing.assert_close(neuron.v_th.grad, (G * (xbar > vth).float()).sum())


def test_dsr_lif_weights_recent_steps_more():
    T, decay = 4, 0.5
    neuron = DSRLIF(decay=decay, v_th=1.0, step_mode="m")
    x = torch.full((T, 3), 0.5, requires_grad=True)
    neuron(x).backward(torch.ones(T, 3))
    w = torch.tensor([decay ** (T - 1 - t) for t in range(T)])
    torch.testing.assert_close(x.grad[:, 0], T * w / w.sum())   # G = T (sum of ones)


def test_dsr_surrogate_on_plain_if_neuron():
    T, vth = 6, 2.0
    neuron = IF(v_th=vth, surrogate=make_surrogate("dsr"), step_mode="m")
    x = (torch.rand(T, 50) * 3).requires_grad_()
    out = neuron(x)
    assert torch.equal(out, IF(v_th=vth, step_mode="m")(x.detach()))   # forward unchanged, 0/1 spikes
    gy = torch.randn(T, 50)
    out.backward(gy)
    xbar = x.detach().mean(0)
    inside = ((xbar >= 0) & (xbar <= vth)).float()
    torch.testing.assert_close(x.grad, (gy.sum(0) * inside / (T * vth)).expand(T, -1))


def test_dsr_network_trains_threshold_and_is_left_alone_by_insert_surrogate():
    torch.manual_seed(0)
    net = nn.Sequential(DirectEncoder(), nn.Linear(8, 16), DSRIF(alpha=0.5), nn.Linear(16, 16),
                        DSRLIF(tau=4.0), nn.Linear(16, 3), Readout())
    g = unroll_timesteps(snnc.trace(net, torch.zeros(2, 8)), T=4)
    g = insert_surrogate(g, kind="atan")      # the DSR neurons keep their own backward
    assert "snn.dsr_if(%2) {v_th=1, reset=subtract, alpha=0.5} (v_th=f32[])" in snnc.dump(g)
    assert "surrogate" not in snnc.dump(g)
    before = [p.detach().clone() for n, p in g.named_parameters() if n.endswith("v_th")]
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    nn.functional.cross_entropy(g(torch.rand(16, 8) * 2), torch.randint(0, 3, (16,))).backward()
    opt.step()
    after = [p.detach() for n, p in g.named_parameters() if n.endswith("v_th")]
    assert len(after) == 2 and any(not torch.equal(a, b) for a, b in zip(after, before))


def test_dsr_options_are_checked():
    with pytest.raises(ValueError, match="alpha"):
        DSRIF(alpha=0.0)
    with pytest.raises(ValueError, match="subtraction"):
        DSRLIF(tau=2.0, reset="zero")
    with pytest.raises(TypeError, match="whole sequence"):
        IF(surrogate=make_surrogate("dsr"))(torch.ones(2))
    with pytest.raises(ValueError, match="no parameters"):
        make_surrogate("dsr", alpha=2)
    assert LIF(tau=2.0).surrogate is None
