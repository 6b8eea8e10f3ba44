"""Framework import: spikingjelly and snntorch models traced into snnc ops, run side by side with
the framework itself; spikes must be identical."""
import pytest
import torch
from torch import nn

import snnc
from snnc.errors import UnsupportedOp


def _scale_weights(model, std=0.6):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, std)
            elif p.dim() == 1:
                p.uniform_(-0.2, 0.3)
    return model


# --- spikingjelly ----------------------------------------------------------------------------

@pytest.fixture
def sj():
    pytest.importorskip("spikingjelly.activation_based")
    import spikingjelly.activation_based.functional
    import spikingjelly.activation_based.layer
    import spikingjelly.activation_based.neuron
    return spikingjelly.activation_based


def _sj_net(sj, mode):
    layer, neuron = sj.layer, sj.neuron
    return _scale_weights(nn.Sequential(
        layer.Conv2d(2, 8, 3, padding=1, step_mode=mode), layer.BatchNorm2d(8, step_mode=mode),
        neuron.LIFNode(tau=3.0, step_mode=mode),
        layer.MaxPool2d(2, step_mode=mode), neuron.IFNode(v_reset=None, v_threshold=0.5, step_mode=mode),
        layer.Flatten(step_mode=mode), layer.Linear(8 * 4 * 4, 10, step_mode=mode),
        neuron.ParametricLIFNode(init_tau=2.5, v_reset=-0.2, v_threshold=0.8, step_mode=mode),
        layer.Linear(10, 6, step_mode=mode), neuron.LIFNode(tau=2.0, decay_input=False, v_reset=None, step_mode=mode),
    ), std=1.5).eval()


def test_spikingjelly_single_step_model_matches_bit_for_bit(sj):
    m = _sj_net(sj, "s")
    x = torch.rand(12, 4, 2, 8, 8) * 1.5
    sj.functional.reset_net(m)
    with torch.no_grad():
        ref = torch.stack([m(xt) for xt in x])
    g = snnc.trace(m, x[0])
    assert snnc.dump(g).splitlines()[1:] == [
        "  %1 : f32[4,8,8,8] = nn.conv2d(%0) {out=8, kernel=3, stride=1, pad=1} (weight=f32[8,2,3,3], bias=f32[8])  # 0",
        "  %2 : f32[4,8,8,8] = nn.batch_norm(%1) {eps=1e-05} (weight=f32[8], bias=f32[8])  # 1",
        "  %3 : spike[4,8,8,8] = snn.lif(%2) {tau=3, decay_input=true, v_th=1, v_reset=0, reset=zero}  # 2",
        "  %4 : spike[4,8,4,4] = nn.max_pool2d(%3) {kernel=2, stride=2, pad=0}  # 3",
        "  %5 : spike[4,8,4,4] = snn.if(%4) {v_th=0.5, reset=subtract}  # 4",
        "  %6 : spike[4,128] = nn.flatten(%5) {start_dim=1}  # 5",
        "  %7 : f32[4,10] = nn.linear(%6) {out=10} (weight=f32[10,128], bias=f32[10])  # 6",
        "  %8 : spike[4,10] = snn.plif(%7) {tau=2.5, v_th=0.8, v_reset=-0.2, reset=zero, v_init=-0.2} (w=f32[])  # 7",
        "  %9 : f32[4,6] = nn.linear(%8) {out=6} (weight=f32[6,10], bias=f32[6])  # 8",
        "  %10 : spike[4,6] = snn.lif(%9) {tau=2, v_th=1, reset=subtract}  # 9",
        "  return %10", "}"]
    out = snnc.run(g, x, T=12)
    assert ref.sum() > 20 and torch.equal(out, ref)
    # membranes: IF and PLIF follow spikingjelly's own arithmetic; LIF divides by tau there
    for name in ("4", "7"):
        assert torch.equal(_last_v(g, x, name), m[int(name)].v)
    assert torch.allclose(_last_v(g, x, "2"), m[2].v, atol=1e-6)


def _last_v(g, x_seq, name):
    snnc.reset(g)
    with torch.no_grad():
        for xt in x_seq:
            g(xt)
    return g.get_submodule(name).v


def test_spikingjelly_multi_step_model_and_containers_match(sj):
    layer, neuron = sj.layer, sj.neuron
    m = _sj_net(sj, "m")
    x = torch.rand(10, 3, 2, 8, 8) * 1.5
    sj.functional.reset_net(m)
    with torch.no_grad():
        ref = m(x)
    g = snnc.trace(m, x)
    text = snnc.dump(g)
    assert text.startswith("graph(%0: f32[10,3,2,8,8]@seq) T=10 {")
    assert "snn.lif(%4) {tau=3, decay_input=true, v_th=1, v_reset=0, reset=zero}  # 2" in text
    # one merge/split pair per run of stateless layers (conv+bn, pool, flatten+linear, linear)
    assert text.count("time.merge") == 4 and text.count("time.split") == 4
    out = snnc.run(g, x)
    assert ref.sum() > 20 and torch.equal(out, ref)

    containers = _scale_weights(nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4)),
        neuron.IFNode(step_mode="m", v_threshold=0.7),
        layer.MultiStepContainer(nn.Flatten(), nn.Linear(4 * 36, 5), neuron.LIFNode(tau=2.0))), std=1.5).eval()
    sj.functional.reset_net(containers)
    with torch.no_grad():
        ref = containers(x)
    g = snnc.trace(containers, x)
    assert [n for n in snnc.dump(g).split() if n.startswith(("snn.", "time.", "nn."))] == [
        "time.merge(%0)", "nn.conv2d(%1)", "nn.batch_norm(%2)", "time.split(%3)", "snn.if(%4)", "time.merge(%5)",
        "nn.flatten(%6)", "nn.linear(%7)", "time.split(%8)", "snn.lif(%9)"]
    out = snnc.run(g, x)
    assert ref.sum() > 10 and torch.equal(out, ref)


def test_spikingjelly_unsupported_neuron_is_named(sj):
    m = nn.Sequential(nn.Linear(3, 3), sj.neuron.ParametricLIFNode(decay_input=False))
    with pytest.raises(UnsupportedOp, match="module '1' \\(spikingjelly ParametricLIFNode\\).*decay_input=False"):
        snnc.trace(m, torch.zeros(1, 3))
    m = nn.Sequential(nn.Linear(3, 3), sj.neuron.KLIFNode())
    with pytest.raises(UnsupportedOp, match="module '1' .*KLIFNode.*supported: .*IFNode, LIFNode"):
        snnc.trace(m, torch.zeros(1, 3))


# --- snntorch -------------------------------------------------------------------------------

@pytest.fixture
def snn():
    return pytest.importorskip("snntorch")


@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_snntorch_leaky_matches_spikes_and_membrane_exactly(snn, reset):
    m = _scale_weights(nn.Sequential(
        nn.Conv2d(1, 4, 3), snn.Leaky(beta=0.8, threshold=0.7, init_hidden=True, reset_mechanism=reset),
        nn.Flatten(), nn.Linear(4 * 36, 5), snn.Leaky(beta=0.6, init_hidden=True, reset_mechanism=reset))).eval()
    x = torch.rand(25, 3, 1, 8, 8) * 2
    from snntorch import utils
    utils.reset(m)
    with torch.no_grad():
        ref = torch.stack([m(xt) for xt in x])
    g = snnc.trace(m, x[0])
    want_reset = "subtract_after_leak" if reset == "subtract" else "zero"
    assert f"snn.lif(%1) {{decay=0.8, v_th=0.7, {'v_reset=0, ' if reset == 'zero' else ''}reset={want_reset}, " \
           "compare=>}  # 1" in snnc.dump(g)
    out = snnc.run(g, x, T=25)
    assert ref.sum() > 20 and torch.equal(out, ref)
    for name, th in (("1", 0.7), ("4", 1.0)):  # snntorch defers the zero reset to the next step
        theirs = m[int(name)].mem
        theirs = torch.where(theirs > th, torch.zeros_like(theirs), theirs) if reset == "zero" else theirs
        assert torch.equal(_last_v(g, x, name), theirs)


def test_snntorch_reset_order_differs_from_spikingjelly_subtract(snn):
    """The reason for reset="subtract_after_leak": with the usual subtract reset the spikes differ."""
    m = nn.Sequential(snn.Leaky(beta=0.5, threshold=1.0, init_hidden=True))
    g = snnc.trace(m, torch.zeros(1, 1))
    x = torch.full((6, 1, 1), 0.9)
    theirs = [m(xt).item() for xt in x]
    mapped = snnc.run(g, x, T=6)[:, 0, 0].tolist()
    plain = snnc.ops.LIF(decay=0.5, compare=">", reset="subtract")
    # by hand: U = 0.9, 1.35 (spike), 0.675+0.9-1 = 0.575, 1.1875 (spike), ...  vs  V = 1.35-1 = 0.35, 1.075 (spike)
    assert theirs == mapped == [0, 1, 0, 1, 0, 1]
    assert [plain(xt).item() for xt in x] == [0, 1, 1, 0, 1, 1]


def test_snntorch_unrepresentable_modules_are_named(snn):
    with pytest.raises(UnsupportedOp, match="module '1' \\(snntorch Leaky\\): inhibition"):
        snnc.trace(nn.Sequential(nn.Linear(2, 2), snn.Leaky(beta=0.9, inhibition=True, init_hidden=True)),
                   torch.zeros(1, 2))
    with pytest.raises(UnsupportedOp, match="module '1' .*RLeaky\\): a convolutional recurrence"):
        snnc.trace(nn.Sequential(nn.Conv2d(1, 2, 3), snn.RLeaky(beta=0.9, conv2d_channels=2, kernel_size=3,
                                                                 init_hidden=True)), torch.zeros(1, 1, 5, 5))
    with pytest.raises(UnsupportedOp, match="module '1' .*Alpha\\): snntorch neuron without an snnc mapping"):
        snnc.trace(nn.Sequential(nn.Linear(2, 2), snn.Alpha(alpha=0.9, beta=0.8, init_hidden=True)), torch.zeros(1, 2))


def test_snntorch_leaky_without_init_hidden_keeps_its_membrane_between_calls(snn):
    """``init_hidden=False`` called without a membrane: snntorch keeps ``self.mem``, and so does the
    snnc neuron; both return ``(spk, mem)``."""
    m = _scale_weights(nn.Sequential(nn.Linear(4, 3), snn.Leaky(beta=0.9, reset_mechanism="zero"))).eval()
    x = torch.rand(7, 2, 4) * 2
    from snntorch import utils
    utils.reset(m)
    with torch.no_grad():
        theirs = [m(xt) for xt in x]
    g = snnc.trace(m, x[0])
    spk, mem = snnc.run(g, x, T=7)
    assert torch.stack([t[0] for t in theirs]).sum() > 2
    assert torch.equal(spk, torch.stack([t[0] for t in theirs])) and torch.equal(mem, torch.stack([t[1] for t in theirs]))


def test_subtract_after_leak_multi_step_equals_single_step_and_unrolls():
    from snnc.ops import LIF
    x = torch.rand(9, 2, 5) * 1.5
    single = LIF(decay=0.7, v_th=0.6, reset="subtract_after_leak")
    want = torch.stack([single(xt) for xt in x])
    multi = LIF(decay=0.7, v_th=0.6, reset="subtract_after_leak", step_mode="m")
    assert want.sum() > 5 and torch.equal(multi(x), want)
    g = snnc.trace(nn.Sequential(nn.Linear(5, 5), LIF(decay=0.7, v_th=0.6, reset="subtract_after_leak")),
                   torch.zeros(2, 5))
    u = snnc.passes.unroll_timesteps(g, T=9)
    assert torch.equal(snnc.run(u, x), snnc.run(g, x, T=9))


def test_subtract_after_leak_trains_through_the_step_loop_with_a_surrogate():
    from snnc.ops import LIF
    insert_surrogate = pytest.importorskip("snnc.passes").__dict__.get("insert_surrogate")
    if insert_surrogate is None:
        pytest.skip("insert_surrogate not on this branch")
    g = snnc.passes.unroll_timesteps(snnc.trace(
        nn.Sequential(nn.Linear(5, 5), LIF(decay=0.7, v_th=0.6, reset="subtract_after_leak")), torch.zeros(2, 5)), T=9)
    x = torch.rand(9, 2, 5) * 1.5
    want = snnc.run(g, x)
    trainable = insert_surrogate(g, kind="atan")
    out = trainable(x)
    assert want.sum() > 5 and torch.equal(out, want)  # the surrogate keeps the forward, reset order included
    out.sum().backward()
    assert trainable.get_submodule("0").weight.grad.abs().sum() > 0
