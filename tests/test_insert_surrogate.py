"""insert_surrogate and the surrogate functions: golden IR, bit-identical forward, backward equal
to the analytic formulas, fused scan equal to autograd through the step loop, STDB's Δt."""
import math

import pytest
import torch
from torch import nn

import snnc
from snnc.errors import SnncError
from snnc.ops import IF, LIF, DirectEncoder, ParametricLIF, Readout
from snnc.ops.neuron_scan import step_loop
from snnc.ops.surrogate import make_surrogate
from snnc.passes import insert_surrogate, unroll_timesteps
from snnc.zoo import digits_snn


# tiny tensors: one thread avoids thread-pool sync costs on a shared CPU
pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN = """\
graph(%0: f32[2,4]) T=3 {
  %1 : f32[2,3] = nn.linear(%0) {out=3} (weight=f32[3,4], bias=f32[3])  # 1
  %2 : f32[3,2,3]@seq = snn.direct_encoder(%1) {T=3}  # encoder_1
  %3 : spike[3,2,3]@seq = snn.lif(%2) {tau=2, v_th=1, reset=subtract, surrogate=rectangular(a=0.5)}  # 2
  %4 : f32[3,2,2]@seq = nn.linear(%3) {out=2} (weight=f32[2,3], bias=f32[2])  # 3
  %5 : f32[2,2] = snn.readout(%4) {mode=membrane}  # 4
  return %5
}
"""
KINDS = ["rectangular", "sigmoid", "atan", "triangle", "stdb"]


def tiny_graph():
    model = nn.Sequential(DirectEncoder(), nn.Linear(4, 3), LIF(tau=2.0), nn.Linear(3, 2), Readout())
    return unroll_timesteps(snnc.trace(model, torch.zeros(2, 4)), T=3)


def test_golden_ir_and_input_untouched():
    g = tiny_graph()
    before = snnc.dump(g)
    out = insert_surrogate(g, kind="rectangular", a=0.5)
    assert snnc.dump(out) == GOLDEN
    assert snnc.dump(g) == before and "surrogate" not in before
    assert snnc.dump(insert_surrogate(out, kind=None)) == before


@pytest.mark.parametrize("kind", KINDS + ["dsr"])
def test_forward_bit_identical_and_gradients_flow(kind):
    g = unroll_timesteps(snnc.trace(digits_snn(4), torch.zeros(3, 1, 8, 8)), T=4)
    s = insert_surrogate(g, kind=kind)
    x = torch.rand(3, 1, 8, 8) * 2
    assert torch.equal(s(x), g(x))
    s(x).sum().backward()
    conv = next(m for m in s.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_per_step_graph_forward_identical(kind):
    g = snnc.trace(digits_snn(4), torch.zeros(3, 1, 8, 8))
    x = torch.rand(3, 1, 8, 8) * 2
    assert torch.equal(snnc.run(insert_surrogate(g, kind=kind), x, T=5), snnc.run(g, x, T=5))


# dΘ/dz written out independently of the implementation (v_th = 0.8)
ANALYTIC = {
    "rectangular": lambda z, vth: (z.abs() < 0.25).double() / 0.5,                     # a = 0.5
    "sigmoid": lambda z, vth: 3 * torch.sigmoid(3 * z) * (1 - torch.sigmoid(3 * z)),   # alpha = 3
    "atan": lambda z, vth: 1.5 / (1 + (math.pi * 1.5 * z) ** 2),                       # alpha = 3
    "triangle": lambda z, vth: 0.5 * torch.clamp(1 - z.abs() / vth, min=0) / vth,     # gamma = 0.5
}
PARAMS = {"rectangular": {"a": 0.5}, "sigmoid": {"alpha": 3}, "atan": {"alpha": 3}, "triangle": {"gamma": 0.5}}


@pytest.mark.parametrize("kind", sorted(ANALYTIC))
@pytest.mark.parametrize("compare", [">=", ">"])
def test_backward_matches_analytic_formula(kind, compare):
    neuron = IF(v_th=0.8, compare=compare)
    z = torch.linspace(-1.5, 1.5, 301, dtype=torch.float64).requires_grad_()
    sg = make_surrogate(kind, **PARAMS[kind])
    s = sg(z, neuron)
    assert torch.equal(s, ((z > 0) if compare == ">" else (z >= 0)).double())
    (grad,) = torch.autograd.grad(s, z, torch.ones_like(s))
    torch.testing.assert_close(grad, ANALYTIC[kind](z.detach(), 0.8), rtol=1e-12, atol=1e-12)


def test_compare_mode_at_threshold():
    z = torch.zeros(1)
    assert sum(make_surrogate("atan")(z, IF(compare=">="))) == 1
    assert sum(make_surrogate("atan")(z, IF(compare=">"))) == 0


def test_stdb_gradient_uses_steps_since_last_spike():
    neuron, sg = IF(v_th=2.0), make_surrogate("stdb", alpha=0.3, beta=0.5)
    zs = [torch.tensor([v], requires_grad=True) for v in (1.0, -1.0, -1.0, 1.0, -1.0)]
    spikes = [sg(z, neuron) for z in zs]   # spikes at t=0 and t=3
    assert [s.item() for s in spikes] == [1, 0, 0, 1, 0]
    grads = [torch.autograd.grad(s, z)[0].item() for s, z in zip(spikes, zs)]
    dts = [1000, 1, 2, 3, 1]   # never spiked before t=0: last spike at -1000 (Rathi's code)
    assert grads == pytest.approx([0.3 * math.exp(-0.5 * dt) / 2.0 for dt in dts], rel=1e-6)
    sg.reset()
    assert torch.autograd.grad(sg(zs[1], neuron), zs[1])[0].item() == pytest.approx(0.15 * math.exp(-500))


def test_stdb_multi_step_equals_single_step():
    x = (torch.rand(6, 3, 5) * 1.5).requires_grad_()
    gy = torch.randn(6, 3, 5)
    lif = LIF(tau=2.0, surrogate=make_surrogate("stdb", beta=0.3), step_mode="m")
    y_m = lif(x)
    (g_m,) = torch.autograd.grad(y_m, x, gy)
    lif.step_mode = "s"
    snnc.reset(lif)
    y_s = torch.stack([lif(x[t]) for t in range(6)])
    (g_s,) = torch.autograd.grad(y_s, x, gy)
    assert torch.equal(y_m, y_s)
    torch.testing.assert_close(g_m, g_s)


NEURONS = [
    lambda: LIF(tau=2.0), lambda: IF(v_th=0.7, reset="zero", v_reset=-0.1),
    lambda: LIF(decay=0.8, decay_input=True, v_leak=0.1, compare=">"),
    lambda: LIF(decay=0.9, v_th=torch.tensor([[0.5], [1.0], [1.5]]), v_init=0.2),
    lambda: LIF(tau=3.0, reset="zero"),
]


@pytest.mark.parametrize("make", NEURONS)
@pytest.mark.parametrize("kind", sorted(ANALYTIC) + ["stdb"])
def test_fused_scan_equals_autograd_step_loop(make, kind):
    neuron = make()
    neuron.surrogate = make_surrogate(kind, beta=0.3) if kind == "stdb" else make_surrogate(kind)
    neuron.step_mode = "m"
    x = (torch.rand(7, 4, 3, 5, dtype=torch.float64) * 1.5).requires_grad_()
    gy = torch.randn(7, 4, 3, 5, dtype=torch.float64)
    y_fused = neuron(x)
    y_loop = step_loop(neuron, x)
    assert torch.equal(y_fused, y_loop)
    torch.testing.assert_close(torch.autograd.grad(y_fused, x, gy)[0], torch.autograd.grad(y_loop, x, gy)[0])


def test_trainable_threshold_and_plif_fall_back_to_step_loop():
    for neuron in (ParametricLIF(learn_threshold=True), LIF(tau=2.0, learn_threshold=True)):
        neuron.surrogate, neuron.step_mode = make_surrogate("atan"), "m"
        neuron(torch.rand(4, 2, 3)).sum().backward()
        assert neuron.v_th.grad is not None and neuron.v_th.grad != 0
    # STDB's per-step spike times must not leak from one multi-step call into the next
    plif = ParametricLIF(surrogate=make_surrogate("stdb", beta=0.5), step_mode="m")
    x = torch.rand(4, 2, 3, requires_grad=True)
    grads = [torch.autograd.grad(plif(x).sum(), x)[0] for _ in range(2)]
    assert torch.equal(grads[0], grads[1])


def test_graph_with_surrogate_saves_and_loads(tmp_path):
    s = insert_surrogate(tiny_graph(), kind="stdb")
    snnc.save(s, tmp_path / "s.snnc")
    s2 = snnc.load_graph(tmp_path / "s.snnc")
    assert snnc.dump(s2) == snnc.dump(s) and "surrogate=stdb(alpha=0.3, beta=0.01)" in snnc.dump(s2)


def test_errors_name_the_problem():
    g = tiny_graph()
    with pytest.raises(SnncError, match="unknown kind 'relu'.*atan"):
        insert_surrogate(g, kind="relu")
    with pytest.raises(SnncError, match="unknown parameter.*'beta'"):
        insert_surrogate(g, kind="atan", beta=2)
    with pytest.raises(SnncError, match="must be > 0"):
        insert_surrogate(g, kind="rectangular", a=0)
    per_step = snnc.trace(digits_snn(4), torch.zeros(1, 1, 8, 8))
    with pytest.raises(SnncError, match="dsr.*unroll_timesteps"):
        insert_surrogate(per_step, kind="dsr")


@pytest.mark.parametrize("make", NEURONS[:3] + [lambda: LIF(tau=1.7, decay_input=True, v_th=torch.tensor(0.6))])
@pytest.mark.parametrize("kind", sorted(ANALYTIC))
def test_native_scan_float32_bit_identical_forward_and_same_gradient(make, kind):
    from snnc.ops import native
    from snnc.ops.neuron_scan import _native_plan
    if native.load() is None:
        pytest.skip(f"native kernels unavailable: {native._state['error']}")
    neuron = make()
    neuron.surrogate, neuron.step_mode = make_surrogate(kind), "m"
    x = (torch.randn(5, 3, 4, 150) * 1.2).requires_grad_()   # > one 512-neuron block, ragged tail
    assert _native_plan(neuron, x, neuron.surrogate) is not None
    gy = torch.randn(5, 3, 4, 150)
    y_native, y_loop = neuron(x), step_loop(neuron, x)
    assert torch.equal(y_native, y_loop)
    torch.testing.assert_close(torch.autograd.grad(y_native, x, gy)[0], torch.autograd.grad(y_loop, x, gy)[0],
                               rtol=1e-5, atol=1e-5)


def test_native_kernel_can_be_disabled(monkeypatch):
    from snnc.ops import native
    monkeypatch.setenv("SNNC_NATIVE", "0")
    assert native.load() is None
    neuron = LIF(tau=2.0, surrogate=make_surrogate("atan"), step_mode="m")
    x = torch.rand(4, 2, 3).requires_grad_()
    assert torch.equal(neuron(x), step_loop(neuron, x))
