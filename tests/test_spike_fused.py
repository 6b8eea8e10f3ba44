"""Fused TVM conv + neuron blocks (targets/spike_fused.py), the default runner of spike blocks on
a VNNI host without AMX: the kernel against float64 within its stated bound (spikes and analog
input), the padded uint8 spike format, whole modules spike for spike against the fp32 reference
with every runner mix, the reuse pool of returned spikes, and several threads."""
import os
import sys

import pytest
import torch
from torch import nn

import snnc
from hostile_util import assert_threads_get_their_own_results
from snnc.ops import LIF
from snnc.targets import tvm_build as tb
from snnc.targets.spike_block import SpikeBlock
from snnc.targets.spike_conv import int8_isa
from snnc.targets.spike_fused import FUSED_ISAS, FusedKernel, fused_block_kernel, padded_spikes, to_padded
from snnc.targets.tvm_hybrid import apply_conv_choices
from snnc.targets.tvm_lower import neuron_scan

sys.path.insert(0, os.path.dirname(__file__))
from test_spike_kernels import firing_case  # noqa: E402  (bench net, weights scaled so every layer fires)

pytest.importorskip("tvm")
pytestmark = pytest.mark.usefixtures("isolated_cache")
needs_vnni = pytest.mark.skipif("avx512_vnni" not in tb.host_isa()["features"], reason="no AVX-512 VNNI on this CPU")
offered = pytest.mark.skipif(int8_isa() not in FUSED_ISAS,
                             reason="blocks race the fused runner only on VNNI hosts without AMX")


def _lif_float64(y, lif):
    """``(spikes, membranes H[t])`` of ``lif`` on currents ``y`` ``[T, ...]`` in float64: its charge,
    fire and subtract-reset rule (the module tests below hold the kernel to ``snnc.run`` itself)."""
    v, spikes, hs = torch.zeros_like(y[0]), [], []
    for t in range(y.shape[0]):
        h = lif.decay * v + y[t]
        s = (h >= lif.v_th).to(y.dtype)
        spikes.append(s)
        hs.append(h)
        v = h - s * lif.v_th
    return torch.stack(spikes), torch.stack(hs)


def _run_kernel(conv, lif, x, analog, out_format):
    steps, n, c, h, w = x.shape
    pad = conv.padding[0]
    rule, _ = neuron_scan(lif, (conv.out_channels, h, w))
    fn = tb.build_kernels({"k": fused_block_kernel(c, conv.out_channels, h, w, *conv.kernel_size, pad, steps, rule,
                                                   out_format, 1, analog)}, tb.llvm_target())["k"]
    k = FusedKernel(conv, binary=not analog)
    # an analog block reads the caller's [T, N, C, H, W] and pads it inside the kernel
    xin = x.clone() if analog else to_padded(x, pad, padded_spikes(x.shape, pad))
    if out_format == "u8pad":
        out = padded_spikes((steps, n, conv.out_channels, h, w), 1)
    else:
        out = torch.empty(steps, n, h, w, conv.out_channels)
    fn(xin if analog else xin.view(torch.int32), k.wq, k.scales, k.bias, out)
    return out, k


@needs_vnni
@pytest.mark.parametrize("analog, size, pad", [(False, 3, 1), (True, 3, 1), (True, 5, 2)])
def test_fused_kernel_spikes_equal_float64_wherever_the_membrane_is_outside_the_bound(analog, size, pad):
    torch.manual_seed(3)
    conv = nn.Conv2d(32, 48, size, padding=pad)
    lif = LIF(tau=2.0)
    with torch.no_grad():
        conv.weight.mul_(6)
    x = torch.rand(3, 2, 32, 9, 11) * 2 if analog else (torch.rand(3, 2, 32, 9, 11) < 0.3).float()
    out, k = _run_kernel(conv, lif, x, analog, "f32")
    got = out.permute(0, 1, 4, 2, 3)
    y64 = nn.functional.conv2d(x.flatten(0, 1).double(), conv.weight.double(), conv.bias.double(),
                               padding=pad).unflatten(0, x.shape[:2])
    ref, h = _lif_float64(y64, lif)
    assert 0.05 < ref.mean() < 0.7  # the layer fires
    # per-output bound on the conv output (fp32 rounding of the sum, plus the int8 digits' bound)
    fp32 = 1e-5 * (conv.weight.abs().sum((1, 2, 3)).double() * x.abs().max() + conv.bias.abs().double())
    bound = fp32 + (0 if analog else k.error_bound.double())
    if not analog:
        assert (k.error_bound < 1e-2).all() and (k.error_bound > 0).all()
    margin, sure = torch.zeros_like(h[0]), torch.ones_like(h[0], dtype=torch.bool)
    for t in range(h.shape[0]):  # the membrane error grows as decay * previous + bound each step
        margin = lif.decay * margin + bound.view(-1, 1, 1)
        sure &= (h[t] - lif.v_th).abs() > margin
    assert sure.float().mean() > 0.9
    assert torch.equal(got[:, sure], ref.float()[:, sure])
    assert (got == ref.float()).float().mean() >= 0.999


@needs_vnni
@pytest.mark.parametrize("analog", [False, True])
def test_padded_uint8_output_is_the_fp32_output_inside_a_zero_border(analog):
    torch.manual_seed(4)
    conv, lif = nn.Conv2d(16, 32, 3, padding=1), LIF(tau=2.0)
    with torch.no_grad():
        conv.weight.mul_(8)
    x = torch.rand(2, 3, 16, 6, 8) * 2 if analog else (torch.rand(2, 3, 16, 6, 8) < 0.4).float()
    f32, _ = _run_kernel(conv, lif, x, analog, "f32")
    u8, _ = _run_kernel(conv, lif, x, analog, "u8pad")
    assert u8.dtype == torch.uint8 and u8.shape == (2, 3, 8, 10, 32)
    assert torch.equal(u8[:, :, 1:-1, 1:-1].float(), f32) and f32.sum() > 0
    border = u8.clone()
    border[:, :, 1:-1, 1:-1] = 0
    assert int(border.sum()) == 0


@pytest.fixture(scope="module")
def firing():
    g, x = firing_case()
    return g, x, snnc.run(g, x)


@offered
@pytest.mark.parametrize("choices, formats", [
    (("fused", "fused", "fused"), ["u8pad", "u8pad", "f32"]),
    (("torch", "fused", "fused"), ["u8pad", "u8pad", "f32"]),
    (("fused", "int8", "fused"), ["f32", "u8pad", "f32"]),  # the fused kernel writes no stacked uint8
    (("fused", "fused", "int8"), ["u8pad", "f32", "f32"]),
    (("fused", "fused", "torch"), ["u8pad", "f32", "f32"]),
])
def test_every_runner_mix_agrees_with_the_reference_spike_for_spike(firing, choices, formats):
    g, x, ref = firing
    m = snnc.compile(g, target="tvm:llvm")
    assert m.meta["spike_int8"] is True and set(m.meta["hybrid_convs"]) == {"conv_0", "conv_2", "conv_4"}
    want = dict(zip(("conv_0", "conv_2", "conv_4"), choices))
    assert apply_conv_choices(m._hybrid, want) == want
    blocks = [b for b in m._hybrid.modules() if isinstance(b, SpikeBlock)]
    assert [b.out_format for b in blocks] == formats
    assert [b.in_format for b in blocks[1:]] == formats[:2]
    out = m(x)
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert (out == ref).float().mean().item() >= 0.999


@offered
def test_the_default_races_the_fused_runner_and_reports_its_bound(firing):
    g, x, ref = firing
    m = snnc.compile(g, target="tvm:llvm")
    blocks = [b for b in m._hybrid.modules() if isinstance(b, SpikeBlock)]
    assert all("fused" in b.options() for b in blocks)  # the analog first conv too
    assert all(set(b.race_ms) == set(b.options()) for b in blocks if hasattr(b, "race_ms"))
    apply_conv_choices(m._hybrid, {"conv_0": "fused", "conv_2": "fused", "conv_4": "fused"})
    from snnc.targets.tvm_hybrid import spike_report
    report = spike_report(m._hybrid)
    assert [report[k]["runner"] for k in ("conv_2", "conv_4")] == ["fused", "fused"]
    assert all(report[k]["digits"] == 2 and 0 < report[k]["error_bound"] < 1e-2 for k in ("conv_2", "conv_4"))
    assert (m(x) == ref).float().mean().item() >= 0.999


@offered
def test_returned_spikes_are_reused_only_once_the_caller_drops_them(firing):
    g, x, ref = firing
    m = snnc.compile(g, target="tvm:llvm")
    apply_conv_choices(m._hybrid, {"conv_0": "fused", "conv_2": "fused", "conv_4": "fused"})
    first = m(x)
    kept, held = first.clone(), first.numpy()  # a numpy view holds the storage too
    second = m(torch.rand(4, 3, 3, 16, 16) * 2)
    third = m(torch.rand(4, 3, 3, 16, 16) * 2)  # the pool is full: a new tensor, not a held one
    assert len({first.data_ptr(), second.data_ptr(), third.data_ptr()}) == 3
    assert torch.equal(first, kept) and torch.equal(torch.from_numpy(held), kept)
    ptr = second.data_ptr()
    del second
    again = m(x)  # the dropped buffer comes back, with this call's spikes
    assert again.data_ptr() == ptr and torch.equal(again, first)


@offered
def test_fused_blocks_from_several_threads_give_each_thread_its_own_result(firing):
    g, _, _ = firing
    m = snnc.compile(g, target="tvm:llvm")
    apply_conv_choices(m._hybrid, {"conv_0": "fused", "conv_2": "fused", "conv_4": "fused"})
    assert_threads_get_their_own_results(m, [torch.rand(4, n, 3, 16, 16) * 2 for n in (2, 3, 2, 5)])
