"""Spike-aware int8 kernels (targets/spike_conv.py): conv / linear on 0/1 spikes as int8 oneDNN
kernels with fp32 output, checked against float64 within the stated bound, and end to end in the
``tvm:llvm`` hybrid against the reference and against spikingjelly's own run."""
import pytest
import torch
from torch import nn

import snnc
from snnc.ops import IF, LIF, DirectEncoder, Readout
from snnc.ops.dsr import DSRIF
from snnc.passes import unroll_timesteps
from snnc.targets.spike_conv import SpikeConv2d, SpikeLinear, binary_input, int8_isa, split_int8
from snnc.zoo import bench_net

pytest.importorskip("tvm")
needs_int8 = pytest.mark.skipif(int8_isa() is None, reason="no AMX-INT8 / VNNI on this CPU (or no oneDNN)")


def test_split_int8_digits_reconstruct_within_half_the_last_step():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3) * torch.tensor([1e-3, 0.1, 1, 10, 0, 3]).view(-1, 1, 1, 1)
    for parts in (1, 2, 3):
        digits, scales, last = split_int8(w, parts)
        assert digits.dtype == torch.int8 and digits.shape == (parts * 6, 4, 3, 3)
        assert digits.abs().max() <= 127
        rebuilt = (digits.double() * scales.double().view(-1, 1, 1, 1)).view(parts, 6, 4, 3, 3).sum(0)
        err = (rebuilt - w.double()).abs().flatten(1).amax(1)
        assert (err <= last.double() / 2 * (1 + 1e-6) + 1e-12).all()
        assert torch.equal(rebuilt[4], torch.zeros(4, 3, 3, dtype=torch.float64))  # all-zero channel
    with pytest.raises(ValueError, match="parts=5"):
        split_int8(w, 5)


@needs_int8
@pytest.mark.parametrize("parts", [1, 2, 3])
@pytest.mark.parametrize("conv, shape", [
    (nn.Conv2d(32, 24, 3, padding=1), (6, 32, 10, 10)),
    (nn.Conv2d(16, 8, 3, stride=2, padding=(0, 1), bias=False), (3, 16, 9, 9)),
    (nn.Conv2d(8, 40, 1), (2, 8, 5, 7)),
])
def test_spike_conv_is_within_its_stated_bound_of_exact(conv, shape, parts):
    torch.manual_seed(parts)
    x = (torch.rand(shape) < 0.4).float()
    m = SpikeConv2d(conv, shape, parts)
    with torch.no_grad():
        y = m(x)
        exact = torch.nn.functional.conv2d(x.double(), conv.weight.double(),
                                           None if conv.bias is None else conv.bias.double(),
                                           conv.stride, conv.padding)
        fp32 = conv(x)
    assert y.shape == fp32.shape and y.is_contiguous(memory_format=torch.channels_last)
    err = (y.double() - exact).abs().amax(dim=(0, 2, 3))
    fp32_err = (fp32.double() - exact).abs().amax(dim=(0, 2, 3))
    assert (err <= m.error_bound.double() + 4 * fp32_err + 1e-6).all()
    if parts >= 2:  # the bound is what makes it usable: 2 digits are ~1e-5 of fp32
        assert err.max() < 1e-3


@needs_int8
def test_spike_linear_is_within_its_stated_bound_and_keeps_leading_dims():
    torch.manual_seed(1)
    lin = nn.Linear(200, 30)
    x = (torch.rand(3, 7, 200) < 0.5).float()
    for parts in (1, 2, 3):
        m = SpikeLinear(lin, parts)
        with torch.no_grad():
            y = m(x)
        exact = torch.nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        assert y.shape == (3, 7, 30)
        assert ((y.double() - exact).abs().amax(dim=(0, 1)) <= m.error_bound.double() + 1e-6).all()


def test_grouped_conv_is_refused():
    with pytest.raises(ValueError, match="ungrouped"):
        SpikeConv2d(nn.Conv2d(4, 4, 3, groups=2), (1, 4, 5, 5))


def test_binary_input_follows_layout_ops_to_a_0_1_neuron_only():
    net = nn.Sequential(DirectEncoder(), nn.Conv2d(1, 4, 3), IF(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(4 * 9, 5), DSRIF(), nn.Linear(5, 3), Readout("membrane"))
    g = unroll_timesteps(snnc.trace(net.eval(), torch.zeros(2, 1, 8, 8)), T=2)
    found = {str(type(g.get_submodule(n.target)).__name__) + n.target: binary_input(g, n)
             for n in g.graph.nodes if n.op == "call_module" and type(g.get_submodule(n.target)) in (nn.Conv2d, nn.Linear)}
    # conv after the encoder: analog; linear after IF (through pool + flatten): 0/1;
    # linear after a DSR neuron: spikes of height v_th, not 0/1
    assert list(found.values()) == [False, True, False], found


def _firing_bench_net(channels=(3, 16, 32, 32), gain=4.0):
    torch.manual_seed(0)
    net = bench_net(channels)
    with torch.no_grad():
        for conv in net[0::2]:
            conv.weight *= gain
    return net.eval()


def firing_case(size=16):
    """``(g, x)``: ``_firing_bench_net`` unrolled over T=4 and an input ``[4, 3, 3, size, size]`` on
    which every layer fires."""
    net = _firing_bench_net()
    x = torch.rand(4, 3, 3, size, size) * 2
    return unroll_timesteps(snnc.trace(net, x[0]), T=4), x


@needs_int8
def test_hybrid_int8_convs_agree_with_the_reference_spike_for_spike():
    g, x = firing_case()
    ref = snnc.run(g, x)
    rates = [float(ref.mean())]
    assert 0.05 < rates[0] < 0.6  # the last layer fires: every layer does
    m = snnc.compile(g, target="tvm:llvm", convs="int8", cache=False)
    # the first conv sees the analog input: it stays fp32 in torch
    assert m.meta["hybrid_convs"] == {"conv_0": "torch", "conv_2": "int8", "conv_4": "int8"}
    out = m(x)
    assert (out == ref).float().mean().item() >= 0.999
    other = torch.rand(4, 5, 3, 16, 16) * 2  # another batch size
    assert (m(other) == snnc.run(g, other)).float().mean().item() >= 0.999
    auto = snnc.compile(g, target="tvm:llvm", spike_int8=True, cache=False)
    assert set(auto.meta["hybrid_convs"].values()) <= {"torch", "tvm", "int8", "fused"}  # fused: VNNI hosts
    assert auto.meta["hybrid_convs"]["conv_0"] != "int8"
    assert (auto(x) == ref).float().mean().item() >= 0.999
    exact = snnc.compile(g, target="tvm:llvm", convs="torch", cache=False)  # forced fp32: no int8 anywhere
    assert torch.equal(exact(x), ref)


@needs_int8
def test_hybrid_int8_linear_and_readout_after_channels_last_spikes():
    torch.manual_seed(3)
    net = nn.Sequential(DirectEncoder(), nn.Conv2d(1, 8, 3, padding=1), IF(), nn.Conv2d(8, 16, 3, padding=1),
                        LIF(tau=2.0), nn.Flatten(), nn.Linear(16 * 8 * 8, 32), IF(), nn.Linear(32, 10),
                        Readout("membrane")).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3)
    x = torch.rand(6, 1, 8, 8)
    g = unroll_timesteps(snnc.trace(net, x), T=6)
    ref = snnc.run(g, x)
    m = snnc.compile(g, target="tvm:llvm", convs="int8", cache=False)
    assert set(m.meta["hybrid_convs"].values()) == {"torch", "int8"}
    assert sum(v == "int8" for v in m.meta["hybrid_convs"].values()) == 3  # conv_2, two linears
    assert (m(x) - ref).abs().max().item() < 1e-3


@needs_int8
def test_spikingjelly_tutorial_csnn_in_int8_agrees_with_spikingjelly():
    """A CSNN as spikingjelly's conv tutorial writes it (multi-step, Conv-BN-IF-MaxPool twice,
    Flatten-Linear-IF), compiled with the int8 spike kernels, against spikingjelly's own run."""
    sj = pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(4)
    net = nn.Sequential(
        layer.Conv2d(1, 16, 3, padding=1, bias=False), layer.BatchNorm2d(16), neuron.IFNode(),
        layer.MaxPool2d(2),
        layer.Conv2d(16, 32, 3, padding=1, bias=False), layer.BatchNorm2d(32), neuron.IFNode(),
        layer.MaxPool2d(2),
        layer.Flatten(), layer.Linear(32 * 4 * 4, 64, bias=False), neuron.IFNode(),
        layer.Linear(64, 10, bias=False), neuron.IFNode())
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.mul_(4)
    net.eval()
    x = torch.rand(8, 4, 1, 16, 16)
    functional.reset_net(net)
    with torch.no_grad():
        ref = net(x)
    assert sj is not None and ref.mean() > 0.01
    g = snnc.trace(net, x)
    m = snnc.compile(g, target="tvm:llvm", convs="int8", cache=False)
    assert list(m.meta["hybrid_convs"].values()).count("int8") == 3  # 2nd conv and both linears
    assert (m(x) == ref).float().mean().item() >= 0.999
