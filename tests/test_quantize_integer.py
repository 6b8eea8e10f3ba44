"""quantize_integer: golden IR, exactness where the float SNN is exactly representable, the
integer semantics by hand, clear errors, and (slow) digits accuracy vs the float SNN."""
import pytest
import torch
from torch import nn

import snnc
from snnc.errors import SnncError, UnsupportedOp
from snnc.ops import IF, LIF, DirectEncoder, IntIF, IntLIF, Readout
from snnc.passes import quantize_integer, unroll_timesteps
from snnc.passes.quantize_integer import IntegerOverflowRisk, dequantize_output, quantize_input

GOLDEN = """\
graph(%0: i8[1,1,4,4]) T=2 {
  %1 : i32[1,2,4,4] = int.conv2d(%0) {out=2, kernel=3, stride=1, pad=1, bits=8} (weight=i8[2,1,3,3], bias=i32[2])  # 1
  %2 : i32[2,1,2,4,4]@seq = snn.direct_encoder(%1) {T=2}  # encoder_1
  %3 : spike[2,1,2,4,4]@seq = int.if(%2) {v_th=i32[2,1,1], reset=subtract, state_bits=24}  # 2
  %4 : spike[2,2,4,4]@flat = time.merge(%3)  # merge_time_2
  %5 : i32[2,2,2,2]@flat = int.sum_pool2d(%4) {kernel=2, stride=2}  # 3
  %6 : i32[2,8]@flat = nn.flatten(%5) {start_dim=1}  # 4
  %7 : i32[2,3]@flat = int.linear(%6) {out=3, bits=8} (weight=i8[3,8], bias=i32[3])  # 5
  %8 : i32[2,1,3]@seq = time.split(%7) {T=2}  # split_time_3
  %9 : spike[2,1,3]@seq = int.lif(%8) {leak=shift, shift=2, v_th=i32[3], reset=subtract, state_bits=24}  # 6
  %10 : i32[2,1,2]@seq = int.linear(%9) {out=2, bits=8} (weight=i8[2,3], bias=i32[2])  # 7
  %11 : i32[1,2] = int.readout(%10) {mode=membrane, reduce=sum}  # 8
  return %11
}
"""


def _fill(m, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.rand(p.shape, generator=g) - 0.3)
    return m


def _tiny():
    m = nn.Sequential(DirectEncoder(), nn.Conv2d(1, 2, 3, padding=1), IF(), nn.AvgPool2d(2), nn.Flatten(),
                      nn.Linear(8, 3), LIF(tau=4.0), nn.Linear(3, 2), Readout())
    return unroll_timesteps(snnc.trace(_fill(m, 0), torch.zeros(1, 1, 4, 4)), T=2)


def test_golden_ir_per_channel():
    g = _tiny()
    before = snnc.dump(g)
    q = quantize_integer(g, per_channel=True)
    assert snnc.dump(q) == GOLDEN
    assert snnc.dump(g) == before  # the input graph is not modified
    snnc.verify(q)
    # the layer feeding the readout keeps one scale, so integer logits compare across classes
    assert q.snnc_integer["output_scale"] is not None


def _dyadic_net(seed, readout=True):
    """Weights on a dyadic grid whose maxima make every scale a power of two: the float SNN is
    exactly representable in integers, so the integer IR must reproduce it bit for bit."""
    g = torch.Generator().manual_seed(seed)
    conv, lin = nn.Conv2d(1, 3, 3, padding=1), nn.Linear(3 * 16, 4)
    with torch.no_grad():
        conv.weight.copy_(torch.randint(-127, 128, conv.weight.shape, generator=g) / 8.0)
        conv.weight.view(-1)[0] = 127 / 8.0
        conv.bias.copy_(torch.randint(-64, 64, (3,), generator=g) / 128.0)
        lin.weight.copy_(torch.randint(-127, 128, lin.weight.shape, generator=g) / 4.0)
        lin.weight.view(-1)[0] = -127 / 4.0
        lin.bias.copy_(torch.randint(-8, 8, (4,), generator=g) / 4.0)
    layers = [DirectEncoder(), conv, IF(v_th=0.5), nn.Flatten(), lin]
    layers += [Readout()] if readout else [IF(v_th=20.0, reset="zero")]
    return unroll_timesteps(snnc.trace(nn.Sequential(*layers), torch.zeros(2, 1, 4, 4)), T=4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_when_float_snn_is_representable(seed):
    x = torch.randint(0, 17, (5, 1, 4, 4), generator=torch.Generator().manual_seed(seed)) / 16.0
    g = _dyadic_net(seed)
    q = quantize_integer(g, input_range=127 / 16)
    xq = quantize_input(q, x)
    assert torch.equal(xq.float() / 16, x)
    y = snnc.run(q, xq)
    assert y.dtype == torch.int32
    assert torch.equal(dequantize_output(q, y), snnc.run(g, x).double())
    gs = _dyadic_net(seed, readout=False)
    qs = quantize_integer(gs, input_range=127 / 16)
    spikes = snnc.run(qs, xq)
    assert spikes.dtype == torch.int8 and torch.equal(spikes.float(), snnc.run(gs, x))
    assert 0 < spikes.float().mean() < 1


def _run_neuron(neuron, xs):
    return neuron(torch.tensor(xs).reshape(-1, 1)).reshape(-1).tolist()


def test_integer_lif_semantics_by_hand():
    # shift leak: D - (D >> 1), floor shift: -7 >> 1 = -4 so -7 leaks to -3
    n = IntLIF(v_th=10, leak="shift", shift=1)
    assert _run_neuron(n, [7, 7, 7, -3]) == [0, 1, 0, 0]       # V: 7, 11->1, 1+7=8, 4-3=1
    assert _run_neuron(n, [-7, 0, 0]) == [0, 0, 0]
    assert n.leak(torch.tensor(-7)) == -3 and n.leak(torch.tensor(7)) == 4
    f = IntLIF(v_th=10, leak="fixed", decay_q=2048, frac_bits=12)  # round half up of V / 2
    assert f.leak(torch.tensor(7)) == 4 and f.leak(torch.tensor(-7)) == -3 and f.leak(torch.tensor(6)) == 3
    z = IntLIF(v_th=10, leak="shift", shift=1, reset="zero", v_reset=-2, v_leak=4)
    assert _run_neuron(z, [12, 0]) == [1, 0] and int(z.leak(torch.tensor(-2))) == 1  # 4 + (-6 - -3)


def test_integer_if_saturates_and_compares():
    n = IntIF(v_th=32000, state_bits=16)
    assert _run_neuron(n, [20000, 20000, 0]) == [0, 1, 0]          # H = sat(40000) = 32767 -> 767
    low = IntIF(v_th=5, state_bits=16)
    assert _run_neuron(low, [-30000, -30000, 32773]) == [0, 0, 1]  # -60000 saturates to -32768
    strict = IntIF(v_th=5, compare=">")
    assert _run_neuron(strict, [5, 1]) == [0, 1]


def test_errors_name_the_node():
    bn = nn.Sequential(DirectEncoder(), nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), IF(), Readout())
    g = unroll_timesteps(snnc.trace(bn, torch.zeros(1, 1, 4, 4)), T=2)
    with pytest.raises(UnsupportedOp, match=r"node %_2 .*nn.batch_norm.*fold_bn.*supported: nn.conv2d"):
        quantize_integer(g)
    relu = unroll_timesteps(snnc.trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.zeros(1, 4)), T=2)
    with pytest.raises(UnsupportedOp, match="snnc.convert"):
        quantize_integer(relu)
    lif3 = unroll_timesteps(snnc.trace(nn.Sequential(nn.Linear(4, 4), LIF(tau=3.0)), torch.zeros(1, 4)), T=2)
    with pytest.raises(UnsupportedOp, match="leak='fixed'"):
        quantize_integer(lif3)
    assert snnc.dump(quantize_integer(lif3, leak="fixed")).count("decay_q=2731, frac_bits=12") == 1
    with pytest.raises(SnncError, match="unroll_timesteps"):
        quantize_integer(snnc.trace(nn.Sequential(nn.Linear(4, 4), IF()), torch.zeros(1, 4)))
    for bad in ({"weight_bits": 9}, {"state_bits": 20}, {"leak": "exp"}, {"input_range": 0}):
        with pytest.raises(SnncError, match=next(iter(bad))):
            quantize_integer(_tiny(), **bad)


def test_overflow_prone_state_bits_is_an_error_not_a_wrap():
    # int8 input x int8 weights over a 3x3 fan-in needs > 16 bits of membrane
    with pytest.raises(IntegerOverflowRisk, match=r"state_bits=16 is too small for node %_2 .*fan-in 9.*state_bits=24"):
        quantize_integer(_tiny(), state_bits=16)
    # spikes into a 400-wide layer: fan-in x 127 exceeds 16 bits as well
    wide = nn.Sequential(nn.Linear(4, 400), IF(), nn.Linear(400, 2), IF())
    with torch.no_grad():
        wide[2].weight.fill_(1.0)
    g = unroll_timesteps(snnc.trace(wide, torch.zeros(1, 4)), T=2)
    with pytest.raises(IntegerOverflowRisk, match=r"node %_3 .*fan-in 400 x \|w\| <= 127 x input in \[0, 1\]"):
        quantize_integer(g, state_bits=16, input_bits=2)
    assert quantize_integer(g, state_bits=24, input_bits=2) is not None


def _accuracy(gm, x, y):
    return 100.0 * (snnc.run(gm, x).argmax(-1) == y).float().mean().item()


@pytest.mark.slow
def test_int8_accuracy_within_one_point_of_float_snn_on_digits():
    from int_nets import ann, convert_by_max, train, trained_snn, unrolled

    from snnc.data import digits
    d = digits()
    converted = convert_by_max(train(ann(8), d, epochs=15), d.x_train)
    direct = train(trained_snn(8), d, epochs=4, T=4)
    for name, model, T in (("converted", converted, 32), ("direct", direct, 4)):
        g = unrolled(model, T)
        float_acc = _accuracy(g, d.x_test, d.y_test)
        for kw in ({}, {"per_channel": True}, {"leak": "fixed"}):
            q = quantize_integer(g, weight_bits=8, **kw)
            int_acc = _accuracy(q, quantize_input(q, d.x_test), d.y_test)
            print(name, kw, float_acc, int_acc)
            assert float_acc > 85 and abs(int_acc - float_acc) <= 1.0, (name, kw, float_acc, int_acc)
