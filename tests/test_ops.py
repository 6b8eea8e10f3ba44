"""Every op's single-step and multi-step forms agree, and match hand-computed spike trains."""
import pytest
import torch

import snnc
from snnc.ops import IF, LIF, DirectEncoder, ParametricLIF, PoissonEncoder, Readout


def run_single(op, x_seq):
    snnc.reset(op)
    op.step_mode = "s"
    out = torch.stack([op(x) for x in x_seq])
    snnc.reset(op)
    return out


def run_multi(op, x_seq):
    op.step_mode = "m"
    return op(x_seq)


def test_if_constant_current_subtract_reset_hand_computed():
    # v: 0.3, 0.6, 0.9, 1.2 -> spike, 0.2+0.3=0.5, 0.8, 1.1 -> spike, 0.4
    x = torch.full((8, 1), 0.3)
    s = run_multi(IF(v_th=1.0), x).flatten().tolist()
    assert s == [0, 0, 0, 1, 0, 0, 1, 0]


def test_if_zero_reset_and_strict_compare():
    x = torch.full((6, 1), 0.5)
    assert run_multi(IF(v_th=1.0, reset="zero"), x).flatten().tolist() == [0, 1, 0, 1, 0, 1]
    # v reaches exactly 1.0: '>=' fires, '>' does not
    assert run_multi(IF(v_th=1.0, compare=">", reset="zero"), x).flatten().tolist() == [0, 0, 1, 0, 0, 1]


def test_lif_hand_computed_decay():
    # decay 0.5, input 1.0, v_th 1.5: v = 1, 1.5 -> spike (subtract) 0, 1, 1.5 -> spike
    x = torch.ones(5, 1)
    assert run_multi(LIF(decay=0.5, v_th=1.5), x).flatten().tolist() == [0, 1, 0, 1, 0]


def test_lif_tau_matches_spikingjelly_discretisation():
    lif = LIF(tau=2.0, decay_input=True, v_th=1.0, reset="zero")
    # H = V + (X - V)/tau: with X=1.6: 0.8, 1.2 -> spike -> reset 0, 0.8, 1.2
    x = torch.full((4, 1), 1.6)
    assert run_multi(lif, x).flatten().tolist() == [0, 1, 0, 1]
    assert lif.decay == 0.5


@pytest.mark.parametrize("make", [
    lambda: IF(v_th=0.7), lambda: IF(reset="zero", v_reset=-0.1),
    lambda: LIF(tau=3.0), lambda: LIF(decay=0.8, decay_input=True, v_leak=0.1),
    lambda: LIF(decay=0.9, v_th=torch.tensor([[0.5], [1.0], [1.5]]), compare=">"),
    lambda: ParametricLIF(init_tau=2.5, learn_threshold=True),
    lambda: Readout("spike_count"), lambda: Readout("membrane"),
])
def test_single_and_multi_step_agree(make):
    x = torch.rand(10, 4, 3, 5) * 1.5
    op = make()
    single = run_single(op, x)
    multi = run_multi(op, x)
    if isinstance(op, Readout):
        single = single[-1]
    assert torch.equal(single, multi)


def test_neuron_state_is_reset_and_not_in_state_dict():
    op = LIF(tau=2.0)
    op(torch.ones(2, 3))
    assert op.v is not None and "v" not in op.state_dict()
    snnc.reset(op)
    assert op.v is None


def test_direct_encoder_and_poisson_rates():
    x = torch.tensor([[0.0, 0.25, 0.5, 1.0]])
    enc = DirectEncoder(T=4, step_mode="m")
    assert torch.equal(enc(x), x.expand(4, 1, 4))
    p = PoissonEncoder(seed=3, T=4000, step_mode="m")
    rate = p(x).mean(0)
    assert torch.allclose(rate, x, atol=0.03)
    assert set(p(x).unique().tolist()) <= {0.0, 1.0}


def test_poisson_single_multi_same_draws_and_seeded():
    x = torch.rand(3, 7)
    multi = run_multi(PoissonEncoder(seed=5, T=6), x)
    single = run_single(PoissonEncoder(seed=5), x.expand(6, 3, 7))
    assert torch.equal(single, multi)
    snnc.reset(p := PoissonEncoder(seed=5, T=6, step_mode="m"))
    assert torch.equal(p(x), multi)


def test_signed_poisson_carries_sign():
    x = torch.tensor([[-1.0, 1.0, -0.5]])
    s = PoissonEncoder(seed=0, signed=True, T=2000, step_mode="m")(x)
    assert s[:, 0, 0].eq(-1).all() and s[:, 0, 1].eq(1).all()
    assert abs(s[:, 0, 2].mean().item() + 0.5) < 0.04


def test_lif_default_is_spikingjellys_tau_2():
    sj = pytest.importorskip("spikingjelly.activation_based.neuron")
    assert LIF().tau == 2.0 and LIF().decay == 0.5
    x = torch.rand(6, 3, 5) * 1.5
    ref = sj.LIFNode(step_mode="m", v_reset=None)(x)   # spikingjelly's own defaults, soft reset
    ours = LIF(step_mode="m", decay_input=True)(x)
    assert torch.equal(ours, ref)


def test_bad_neuron_arguments_are_named():
    with pytest.raises(ValueError, match="reset="):
        IF(reset="soft")
    with pytest.raises(ValueError, match="one of tau= or decay=, not both"):
        LIF(tau=2.0, decay=0.5)
    with pytest.raises(ValueError, match="tau=0.5"):
        LIF(tau=0.5)


def test_ops_pickle_with_state(tmp_path):
    p = PoissonEncoder(seed=1)
    p(torch.rand(2, 2))
    torch.save(torch.nn.Sequential(p, LIF(tau=2.0)), tmp_path / "m.pt")
    m = torch.load(tmp_path / "m.pt", weights_only=False)
    assert m[0].seed == 1
