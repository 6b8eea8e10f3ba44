"""Training convolutions (``snnc.ops.train_conv``): the int8 forward on spike inputs within its
stated bound of float64, gradients of the channels_last / int8 modes against float64 autograd,
the native scan on channels_last memory, and ``retrain(convs=...)`` end to end."""
import copy

import pytest
import torch
from torch import nn

import snnc
from snnc.data import digits, loader
from snnc.errors import SnncError
from snnc.ops import LIF, native, train_conv
from snnc.ops.train_conv import produced_here
from snnc.passes import insert_surrogate, unroll_timesteps
from snnc.targets.spike_conv import int8_isa
from snnc.training import int8_error_bound, retrain, spike_convs
from snnc.zoo import digits_snn

T, N = 4, 3


def _default_convs():
    # built under a fixed seed: weights made at import would depend on what the test session
    # imported before (the full suite and a single file drew different nets)
    torch.manual_seed(0)
    return nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 24, 3, padding=1), nn.Conv2d(24, 8, 3, stride=2, padding=1)


def _net(convs=None):
    convs = _default_convs() if convs is None else convs
    torch.manual_seed(0)
    layers = []
    for conv in convs:
        layers += [copy.deepcopy(conv), LIF(tau=2.0, v_th=0.25)]
    net = nn.Sequential(*layers)
    return insert_surrogate(unroll_timesteps(snnc.trace(net, torch.zeros(N, 3, 12, 12)), T=T), kind="atan")


def _x():
    return torch.rand(T, N, 3, 12, 12, generator=torch.Generator().manual_seed(1)) * 3


def _step(g, x, mode):
    """(output, {conv: (input, output, whether the training conv made it)}, parameter gradients)
    of one step in ``mode``; copies, since the neuron after a conv may overwrite its output."""
    seen = {}

    def keep(m, a, o, name):
        seen[name] = (a[0].detach().clone(), o.detach().clone(), produced_here(o))
    hooks = [m.register_forward_hook(lambda m, a, o, name=name: keep(m, a, o, name))
             for name, m in g.named_modules() if isinstance(m, nn.Conv2d)]
    g.zero_grad(set_to_none=True)
    with spike_convs(mode):
        out = g(x)
        out.sum().backward()
    for h in hooks:
        h.remove()
    return out.detach(), seen, [p.grad for p in g.parameters()]


@pytest.mark.parametrize("mode", ["float32", "int8"])
@pytest.mark.parametrize("sparse_rate", [0.0, 1.01])   # dL/dW dense (oneDNN) / event-driven (native)
def test_fast_modes_agree_with_float64_autograd(mode, sparse_rate, monkeypatch):
    monkeypatch.setattr(train_conv, "SPARSE_RATE", sparse_rate)
    g, x = _net(), _x()
    out, seen, grads = _step(g, x, mode)
    g64 = copy.deepcopy(g).double()
    out64, _, grads64 = _step(g64, x.double(), "exact")
    rates = [float(seen[k][0].mean()) for k in ("2", "4")] + [float(out.mean())]
    assert all(ours for _, _, ours in seen.values())            # the training conv ran
    assert seen["2"][1].is_contiguous(memory_format=torch.channels_last)
    assert 0.02 < min(rates) and max(rates) < 0.9, rates    # every layer fires
    assert float((out.double() == out64).double().mean()) >= 0.999    # spike agreement
    for a, b in zip(grads, grads64):
        assert float((a.double() - b).norm() / b.norm()) < 1e-3


def test_int8_forward_is_within_the_stated_bound_of_float64():
    g, x = _net(), _x()
    _, seen, _ = _step(g, x, "int8")
    for name in ("2", "4"):   # the convs fed by spikes
        spikes, y, _ = seen[name]
        conv = g.get_submodule(name)
        assert set(spikes.unique().tolist()) <= {0.0, 1.0} and float(spikes.mean()) > 0.02
        exact = nn.functional.conv2d(spikes.double(), conv.weight.double(), conv.bias.double(),
                                     conv.stride, conv.padding)
        err = (y.detach().double() - exact).abs().amax((0, 2, 3))
        # the digit bound plus fp32 rounding of the sum (|y| * 2^-23 per term, a few terms)
        slack = exact.abs().amax((0, 2, 3)) * 2 ** -20
        assert torch.all(err <= int8_error_bound(conv.weight).double() + slack)
        if int8_isa() is not None:   # the int8 kernel ran: not the fp32 result
            fp32 = nn.functional.conv2d(spikes, conv.weight, conv.bias, conv.stride, conv.padding)
            assert not torch.equal(y.detach(), fp32)


def test_grouped_dilated_and_same_padding_convs_fall_back_and_agree():
    convs = (nn.Conv2d(3, 8, 3, padding="same"), nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2),
             nn.Conv2d(8, 8, 3, padding=1))
    g, x = _net(convs), _x()
    out, seen, grads = _step(g, x, "int8")
    out0, _, grads0 = _step(g, x, "exact")
    assert not seen["0"][2]        # padding="same": torch's own conv
    assert seen["2"][2]            # grouped: channels_last fp32
    assert float((out == out0).float().mean()) >= 0.999
    for a, b in zip(grads, grads0):
        assert float((a - b).norm() / b.norm()) < 1e-3


def test_native_scan_on_channels_last_memory_equals_row_major():
    lib = native.load()
    if lib is None:
        pytest.skip("native kernels unavailable")
    p = dict(decay=0.5, gain=1.0, decay_input=False, v_leak=0.0, v_th=1.0, zero_reset=False,
             v_reset=0.0, v_init=0.0, strict=False)
    x = torch.randn(T, N, 5, 6, 7).mul_(2)
    xcl = x.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (T, N))
    assert native.time_major(xcl) and not xcl.is_contiguous()
    s, s8, z = native.scan_forward(lib, x, p)
    scl, s8cl, zcl = native.scan_forward(lib, xcl, p)
    assert scl.stride() == s8cl.stride() == zcl.stride() == xcl.stride()   # no copy to row-major
    assert torch.equal(s, scl) and torch.equal(s8, s8cl) and torch.equal(z, zcl)
    gs = torch.randn(x.shape)
    gx = native.scan_backward(lib, z, s8, gs, p, "atan", 2.0)
    gxcl = native.scan_backward(lib, zcl, s8cl, gs, p, "atan", 2.0)   # row-major dL/dS: copied to z's layout
    assert gxcl.stride() == zcl.stride() and torch.equal(gx, gxcl)


@pytest.mark.parametrize("stride, padding, dilation", [((1, 1), (1, 1), (1, 1)), ((2, 1), (1, 0), (1, 2))])
def test_event_driven_weight_gradient_equals_float64(stride, padding, dilation):
    lib = native.load()
    if lib is None:
        pytest.skip("native kernels unavailable")
    gen = torch.Generator().manual_seed(0)
    s8 = (torch.rand(3, 6, 11, 9, generator=gen) < 0.3).to(torch.uint8).contiguous(memory_format=torch.channels_last)
    w = torch.randn(5, 6, 3, 3, generator=gen)
    gy = torch.randn(nn.functional.conv2d(s8.float(), w, None, stride, padding, dilation).shape, generator=gen)
    gy = gy.contiguous(memory_format=torch.channels_last)
    ref = torch.ops.aten.convolution_backward(gy.double(), s8.double(), w.double(), None, list(stride), list(padding),
                                              list(dilation), False, [0, 0], 1, [False, True, False])[1]
    dw = native.spike_weight_grad(lib, s8, gy, w.shape, (list(stride), list(padding), list(dilation), 1))
    # a sum of exact products (s = 1) in fp32: within k * 2^-24 * sum|dY| of float64, k the terms summed
    terms = ref.new_tensor(float(s8.sum()))
    assert dw.shape == ref.shape and float((dw.double() - ref).abs().max()) <= float(terms * 2 ** -24 * gy.abs().sum())
    assert float((dw.double() - ref).abs().max()) < 1e-4 * float(ref.abs().max())


def test_retrain_int8_convs_learns_and_a_bad_mode_is_named():
    d = digits()
    g = insert_surrogate(unroll_timesteps(snnc.trace(digits_snn(8), torch.zeros(2, 1, 8, 8)), T=4), kind="atan")
    with pytest.raises(SnncError, match="convs"):
        retrain(g, loader(d.x_train[:64], d.y_train[:64], 32), convs="bf16", progress=False)
    torch.manual_seed(0)
    hist = retrain(g, loader(d.x_train[:512], d.y_train[:512], 32, shuffle=True, seed=0), epochs=3, lr=3e-3,
                   val_loader=loader(d.x_test, d.y_test, 256), progress=False, convs="int8")
    assert hist[-1]["loss"] < hist[0]["loss"] and hist[-1]["val_acc"] > 50
