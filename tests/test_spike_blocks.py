"""Fused spike blocks (targets/spike_block.py): conv + neuron in one call, uint8 "stacked digit"
spikes between int8 layers; the default of ``tvm:llvm`` on an AMX / VNNI CPU. Checked against
float64 within the stated bound, against the fp32 reference spike for spike (every layer fires),
from several threads, without the int8 ISA, and through export / load at another batch size."""
import os
import sys

import pytest
import torch
from torch import nn

import snnc
from hostile_util import assert_threads_get_their_own_results
from snnc.ops import LIF
from snnc.targets import tvm as tvm_target
from snnc.targets.spike_block import HI, SpikeBlock, stack_spikes, stacked_int8
from snnc.targets.spike_conv import int8_isa

sys.path.insert(0, os.path.dirname(__file__))
from test_spike_kernels import firing_case  # noqa: E402  (bench net, weights scaled so every layer fires)

pytest.importorskip("tvm")
pytestmark = pytest.mark.usefixtures("isolated_cache")
needs_int8 = pytest.mark.skipif(int8_isa() is None, reason="no AMX-INT8 / VNNI on this CPU (or no oneDNN)")


def test_stacked_digits_rebuild_every_weight_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(5, 3, 3, 3) * torch.tensor([1e-3, 0.1, 1, 10, 0]).view(-1, 1, 1, 1)
    digits, scale, step = stacked_int8(w)
    assert digits.dtype == torch.int8 and digits.shape == (5, 6, 3, 3) and scale.dtype == torch.float32
    hi, lo = digits[:, :3].double(), digits[:, 3:].double()
    rebuilt = scale.double().view(-1, 1, 1, 1) * (HI * hi + lo)
    err = (rebuilt - w.double()).abs().flatten(1).amax(1)
    assert (err <= step.double() / 2 * (1 + 1e-9)).all()
    assert (step[:4] <= w.abs().flatten(1).amax(1)[:4] / (127 * HI) * (1 + 1e-6)).all()  # ~2^-15 of max|w|
    assert torch.equal(rebuilt[4], torch.zeros(3, 3, 3, dtype=torch.float64))


def test_stack_spikes_writes_the_high_and_low_copies_channels_last():
    x = (torch.rand(2, 3, 4, 5, 6) < 0.5).float()
    s = stack_spikes(x)
    assert s.dtype == torch.uint8 and s.shape == (2, 3, 8, 5, 6)
    assert torch.equal(s[:, :, 4:].float(), x) and torch.equal(s[:, :, :4].float(), HI * x)
    assert s.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)


@needs_int8
@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(32, 48, 3, padding=1), (6, 32, 10, 10)),
    (nn.Conv2d(16, 16, 3, stride=2, padding=(0, 1), bias=False), (3, 16, 9, 9)),
    (nn.Conv2d(8, 32, 1), (2, 8, 5, 7)),
])
def test_block_int8_conv_is_within_its_stated_bound_of_float64(conv, shape):
    torch.manual_seed(1)
    x = (torch.rand(shape) < 0.4).float()
    block = SpikeBlock(conv, shape, 1, "conv_0", {}, binary=True)
    block.choice = "int8"
    with torch.no_grad():
        y = block._conv(stack_spikes(x))
        fp32 = conv(x)
    exact = torch.nn.functional.conv2d(x.double(), conv.weight.double(),
                                       None if conv.bias is None else conv.bias.double(), conv.stride, conv.padding)
    assert y.shape == fp32.shape and y.is_contiguous(memory_format=torch.channels_last)
    err = (y.double() - exact).abs().amax(dim=(0, 2, 3))
    fp32_err = (fp32.double() - exact).abs().amax(dim=(0, 2, 3))
    assert (err <= block.error_bound.double() + 4 * fp32_err + 1e-6).all(), (err, block.error_bound)
    assert err.max() < 1e-3


def _layer_spikes(g, x):
    out = []
    hooks = [m.register_forward_hook(lambda m, i, o: out.append(o.clone())) for m in g.modules() if isinstance(m, LIF)]
    snnc.run(g, x)
    for h in hooks:
        h.remove()
    return out


@pytest.fixture(scope="module")
def firing():
    return firing_case()


@needs_int8
def test_default_tvm_llvm_fuses_int8_blocks_and_agrees_spike_for_spike(firing):
    g, x = firing
    layers = _layer_spikes(g, x)
    rates = [float(s.mean()) for s in layers]
    assert all(0.05 < r < 0.7 for r in rates), rates  # every layer fires
    ref = layers[-1]
    m = snnc.compile(g, target="tvm:llvm", convs="int8")
    assert m.meta["spike_int8"] is True and m.meta["int8_isa"] == int8_isa()
    # the analog first conv stays fp32; it and the middle block write stacked uint8 spikes
    assert m.meta["hybrid_convs"] == {"conv_0": "torch", "conv_2": "int8", "conv_4": "int8"}
    report = m.meta["spike_layers"]
    assert [report[k]["writes"] for k in ("conv_2", "conv_4")] == ["u8x2", "f32"]
    assert 0 < report["conv_4"]["error_bound"] < 1e-2  # worst case: k * max|w| / (2 * 127 * 254)
    blocks = [b for b in m._hybrid.modules() if isinstance(b, SpikeBlock)]
    assert [b.out_format for b in blocks] == ["u8x2", "u8x2", "f32"]
    out = m(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out == ref).float().mean().item() >= 0.999
    auto = snnc.compile(g, target="tvm:llvm")  # the race picks per layer; still within the bound
    assert auto.meta["spike_int8"] is True and auto.meta["hybrid_convs"]["conv_0"] != "int8"
    assert (auto(x) == ref).float().mean().item() >= 0.999
    off = snnc.compile(g, target="tvm:llvm", spike_int8=False)  # the opt-out is fp32, bit for bit
    assert off.meta["spike_int8"] is False and "spike_layers" not in off.meta
    assert not any(isinstance(b, SpikeBlock) for b in off._hybrid.modules())
    assert torch.equal(off(x), ref)


@needs_int8
def test_blocks_run_any_batch_and_outputs_are_not_overwritten(firing):
    g, x = firing
    m = snnc.compile(g, target="tvm:llvm", convs="int8")
    first = m(x)
    kept = first.clone()
    other = torch.rand(4, 5, 3, 16, 16) * 2
    assert (m(other) == snnc.run(g, other)).float().mean().item() >= 0.999
    one = torch.rand(4, 1, 3, 16, 16) * 2
    assert (m(one) == snnc.run(g, one)).float().mean().item() >= 0.999
    assert torch.equal(first, kept)  # later calls did not write into the tensor the caller holds


@needs_int8
def test_blocks_from_several_threads_give_each_thread_its_own_result(firing):
    g, _ = firing
    m = snnc.compile(g, target="tvm:llvm", convs="int8")
    assert_threads_get_their_own_results(m, [torch.rand(4, n, 3, 16, 16) * 2 for n in (2, 3, 2, 5)])


def test_without_the_int8_isa_the_default_is_fp32_and_exact(firing, monkeypatch):
    g, x = firing
    monkeypatch.setattr(tvm_target, "int8_isa", lambda: None)
    from snnc.targets import tvm_hybrid
    monkeypatch.setattr(tvm_hybrid, "int8_isa", lambda: None)
    m = snnc.compile(g, target="tvm:llvm", spike_int8=None)
    assert m.meta["spike_int8"] is False and m.meta["int8_isa"] is None
    assert "int8" not in m.meta["hybrid_convs"].values()
    assert torch.equal(m(x), snnc.run(g, x))
    forced = snnc.compile(g, target="tvm:llvm", spike_int8=True)  # asked for, but nothing to run it on
    assert forced.meta["spike_int8"] is False and torch.equal(forced(x), snnc.run(g, x))


def test_spike_int8_must_be_none_or_a_bool(firing):
    g, _ = firing
    with pytest.raises(snnc.errors.SnncError, match="spike_int8='yes'"):
        snnc.compile(g, target="tvm:llvm", spike_int8="yes")


@needs_int8
@pytest.mark.slow
def test_export_and_load_at_another_batch_size(firing, tmp_path):
    g, x = firing
    m = snnc.compile(g, target="tvm:llvm", convs="int8")
    path = tmp_path / "net.so"
    m.export(path)
    loaded = snnc.load(path)
    other = torch.rand(4, 6, 3, 16, 16) * 2
    ref = snnc.run(g, other)
    assert (loaded(other) == ref).float().mean().item() >= 0.999
    assert (m(other) == ref).float().mean().item() >= 0.999


@needs_int8
@pytest.mark.parametrize("tile", [256 * 1024, 40 * 1024])  # whole steps per call / slices of a step
def test_tiled_blocks_carry_the_membrane_across_tiles(firing, monkeypatch, tile):
    from snnc.targets import spike_block
    g, x = firing
    m = snnc.compile(g, target="tvm:llvm", convs="int8")
    whole = m(x)
    monkeypatch.setattr(spike_block, "TILE_BYTES", tile)
    blocks = [b for b in m._hybrid.modules() if isinstance(b, SpikeBlock)]
    assert any(b.tiles(4, 3) != (4, 3) for b in blocks)
    assert torch.equal(m(x), whole)  # the same arithmetic, only split into more calls


@needs_int8
def test_spikingjelly_conv_lif_net_runs_in_blocks_and_agrees_with_spikingjelly():
    """Conv-LIF layers as spikingjelly's multi-step tutorials write them (``layer.Conv2d`` +
    ``neuron.LIFNode``, ``step_mode="m"``), compiled by default, against spikingjelly's run."""
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(5)
    net = nn.Sequential(layer.Conv2d(2, 16, 3, padding=1), neuron.LIFNode(tau=2.0),
                        layer.Conv2d(16, 32, 3, padding=1), neuron.LIFNode(tau=2.0),
                        layer.Conv2d(32, 32, 3, padding=1), neuron.LIFNode(tau=2.0))
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(12)  # rates 0.32 / 0.22 / 0.19: every layer fires
    net.eval()
    x = torch.rand(4, 3, 2, 12, 12) * 2
    functional.reset_net(net)
    rates = []
    for lif in (m for m in net if isinstance(m, neuron.LIFNode)):
        lif.register_forward_hook(lambda mod, i, o: rates.append(o.mean().item()))
    with torch.no_grad():
        ref = net(x)
    assert all(0.05 < r < 0.7 for r in rates), rates
    m = snnc.compile(snnc.trace(net, x), target="tvm:llvm", convs="int8")
    blocks = [b for b in m._hybrid.modules() if isinstance(b, SpikeBlock)]
    assert [b.choice for b in blocks] == ["torch", "int8", "int8"]
    assert (m(x) == ref).float().mean().item() >= 0.999


def grey_conv_net():
    """Conv-LIF x2 + Linear-LIF on one input channel (8x8 grey images: the digits), every layer
    firing on the digits (17% / 9% / 21%)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), LIF(), nn.Conv2d(16, 16, 3, padding=1), LIF(),
                        nn.Flatten(), nn.Linear(16 * 64, 10), LIF()).eval()
    with torch.no_grad():
        for layer, gain in zip((net[0], net[2], net[5]), (4, 3, 6)):
            layer.weight.mul_(gain)
    return net


@needs_int8
def test_a_one_channel_image_net_runs_every_block_runner():
    """A conv on one input channel (grey images: MNIST, the digits) may return NCHW even on a
    channels_last input (both layouts are the same memory there); the neuron kernel after it takes
    compact rows only. Found with the digits data through ``snnc compile --target tvm:llvm``."""
    from snnc.targets.tvm_hybrid import apply_conv_choices
    g = snnc.passes.unroll_timesteps(snnc.trace(grey_conv_net(), torch.zeros(1, 1, 8, 8)), T=4)
    x = snnc.data.digits().x_train[:32].unsqueeze(0).expand(4, 32, 1, 8, 8).contiguous()
    ref = snnc.run(g, x)
    assert 0.02 < float(ref.mean()) < 0.8
    m = snnc.compile(g, target="tvm:llvm", cache=False)
    blocks = [b for b in m._hybrid.modules() if isinstance(b, SpikeBlock)]
    for choice in {c for b in blocks for c in b.options()}:
        apply_conv_choices(m._hybrid, {b.name: choice for b in blocks if choice in b.options()})
        assert float((m(x) == ref).float().mean()) >= 0.999, choice
