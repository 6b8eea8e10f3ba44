"""Int8 spike convolutions inside the exported tvm:llvm library (``targets/tvm_spike_conv.py``).

Convs whose input is 0/1 spikes run as uint8 x int8 -> int32 kernels (AVX-512 VNNI, or
AVX-512BW's pmaddubsw/pmaddwd) with two int8 weight digits; the error against float64 must stay
within the stated bound, the library must agree with the reference on spikes, survive export /
load at another batch size and several threads, and fall back to the fp32 schedule (identical
to the fp32 build) on a host without the instructions.
"""
import os
import sys
import threading

import pytest
import torch
import torch.nn.functional as F
import tvm
from torch import nn

import snnc
from snnc.errors import SnncError
from snnc.passes import unroll_timesteps
from snnc.targets import tvm_build as tb
from snnc.targets import tvm_spike_conv as sc
from snnc.targets.tvm import _prepare
from snnc.targets.tvm_lower import to_relax

sys.path.insert(0, os.path.dirname(__file__))
from test_tvm_library import _conv_lif_net  # noqa: E402  (the bench net's pattern, every layer firing)

pytestmark = pytest.mark.usefixtures("isolated_cache")

HOST = tb.host_isa()["features"]
HOST_ISAS = [isa for isa, flag in (("vnni", "avx512_vnni"), ("avx512bw", "avx512bw")) if flag in HOST]
needs_int8 = pytest.mark.skipif(not HOST_ISAS, reason="no AVX-512 VNNI / BW on this CPU")
HAS_AMX = {"amx_tile", "amx_int8", "avx512_vnni"} <= set(HOST) and sc.amx_permission()
needs_amx = pytest.mark.skipif(not HAS_AMX, reason="no AMX-INT8 (or no tile permission) here")
BEST = "amx" if HAS_AMX else (HOST_ISAS or ["fp32"])[0]


def _net(channels=(3, 32, 32, 48), seed=0):
    return _conv_lif_net(channels, seed)


@pytest.fixture(scope="module")
def net():
    g = unroll_timesteps(snnc.trace(_net(), torch.zeros(2, 3, 12, 12)), T=4)
    return {"g": g, "ref": snnc.compile(g, target="torch"),
            "int8": snnc.compile(g, target="tvm:llvm", mode="relax"),
            "fp32": snnc.compile(g, target="tvm:llvm", mode="relax", spike_convs="fp32")}


def _kernel(conv, shape, isa):
    N, C, H, W = shape
    pad, stride = conv.padding[0], conv.stride[0]
    lib = tb.build_kernels({"pack": sc.pack_kernel(C, H, W, pad),
                            "conv": sc.conv_kernel(C, conv.out_channels, H, W, *conv.kernel_size, stride, pad, isa)},
                           tb.llvm_target())
    wq, scales, bias, bound = sc.pack_weights(conv)

    def run(x):
        packed = torch.empty(N, -(-C // 4), H + 2 * pad, W + 2 * pad, dtype=torch.int32)
        Ho, Wo = (H + 2 * pad - conv.kernel_size[0]) // stride + 1, (W + 2 * pad - conv.kernel_size[1]) // stride + 1
        y = torch.empty(N, conv.out_channels, Ho, Wo)
        lib["pack"](x, packed)
        lib["conv"](packed, *(tvm.runtime.tensor(a) for a in (wq, scales, bias)), y)
        return y, packed
    return run, torch.as_tensor(bound)


@needs_int8
@pytest.mark.parametrize("isa", HOST_ISAS)
@pytest.mark.parametrize("C,O,HW,k,stride,pad", [(64, 32, 12, 3, 1, 1), (6, 16, 9, 3, 2, 0), (13, 48, 7, 1, 1, 0)])
def test_int8_conv_is_within_the_stated_bound_of_float64(isa, C, O, HW, k, stride, pad):
    torch.manual_seed(1)
    conv = nn.Conv2d(C, O, k, stride=stride, padding=pad)
    with torch.no_grad():
        conv.weight.mul_(5.0)
    x = (torch.rand(3, C, HW, HW) < 0.3).float()
    x[0] = 1.0  # every input active: the worst case of the bound
    run, bound = _kernel(conv, x.shape, isa)
    y, packed = run(x)
    want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride=stride, padding=pad)
    err = (y.double() - want).abs().amax((0, 2, 3))
    # the stated bound (digit rounding) + fp32 rounding of the 3-term sum (a few ulp of |y|)
    slack = 4 * torch.finfo(torch.float32).eps * want.abs().amax((0, 2, 3))
    assert (err <= bound.double() + slack).all(), (err / bound).max()
    assert err.max() > 0  # fp32 weights are not exact in two int8 digits: the check has teeth
    # the pack: channel 4g+j in byte j, zero border
    b = packed.view(torch.uint8).view(3, -1, HW + 2 * pad, HW + 2 * pad, 4)
    assert torch.equal(b.permute(0, 1, 4, 2, 3).reshape(3, -1, HW + 2 * pad, HW + 2 * pad)[:, :C].float(),
                       F.pad(x, (pad,) * 4))


def test_pack_weights_layout_matches_split_int8():
    """Golden layout: Wq[digit, o // 16, c // 4, ky, kx, (o % 16) * 4 + c % 4] is digit p of w[o, c, ky, kx]."""
    from snnc.targets.spike_conv import split_int8
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 32, 3)
    wq, scales, bias, bound = sc.pack_weights(conv)
    digits, s, last = split_int8(conv.weight, 2)
    assert wq.shape == (2, 2, 2, 3, 3, 64) and scales.shape == (2, 32)
    d = digits.reshape(2, 32, 6, 3, 3)
    for o, c, ky, kx in ((0, 0, 0, 0), (17, 5, 2, 1), (31, 3, 1, 2)):
        for p in range(2):
            assert wq[p, o // 16, c // 4, ky, kx, (o % 16) * 4 + c % 4] == d[p, o, c, ky, kx]
    assert (wq[:, :, 1, :, :, :].reshape(2, 2, 9, 16, 4)[..., 2:] == 0).all()  # channels 6, 7: zero
    assert torch.allclose(torch.as_tensor(bound), 6 * 9 * last / 2)


@needs_int8
def test_library_uses_int8_for_spike_inputs_only_and_agrees(net):
    g = _prepare(net["g"], None)
    mod = to_relax(g, "cpu", batch="any", spike_convs=HOST_ISAS[0])
    names = sorted(gv.name_hint for gv in mod.functions)
    # the first conv reads the (real-valued) input: fp32; the two convs after LIF layers: int8
    calls = mod["main"].script().count("R.call_tir(spike_conv2d")
    assert calls == 2 and sum(n.startswith("spike_pack") for n in names) == 1  # 32 -> 32 and 32 -> 48: one pack
    assert net["int8"].meta["spike_convs"] == BEST
    for n in (1, 5):
        x = torch.rand(4, n, 3, 12, 12) * 2
        want = net["ref"](x)
        assert want.mean() > 0.05
        assert (net["int8"](x) == want).float().mean() >= 0.999


@needs_int8
def test_exported_int8_library_round_trip_at_another_batch(net, tmp_path):
    loaded = snnc.load(net["int8"].export(tmp_path / "net.so"))
    assert loaded.meta["spike_convs"] == BEST and loaded.meta["library_batch"] == "any"
    x = torch.rand(4, 7, 3, 12, 12) * 2  # traced at 2
    assert torch.equal(loaded(x), net["int8"](x))
    assert (loaded(x) == net["ref"](x)).float().mean() >= 0.999


def test_fp32_fallback_when_the_host_lacks_the_instructions(net, monkeypatch):
    """A host without VNNI / AVX-512BW builds the fp32 schedule: the same library as spike_convs="fp32"."""
    real = tb.host_isa()
    monkeypatch.setattr(tb, "host_isa", lambda: {"cpu": real["cpu"], "features": ["avx2", "fma", "avx512f"]})
    m = snnc.compile(net["g"], target="tvm:llvm", mode="relax")
    assert m.meta["spike_convs"] == "fp32"
    x = torch.rand(4, 3, 3, 12, 12) * 2
    assert torch.equal(m(x), net["fp32"](x))
    assert (m(x) == net["ref"](x)).float().mean() >= 0.999
    with pytest.raises(SnncError, match=r"spike_convs='vnni' needs a CPU \(and kernel\) with avx512_vnni"):
        snnc.compile(net["g"], target="tvm:llvm", mode="relax", spike_convs="vnni")


@needs_int8
def test_loading_an_int8_library_on_a_cpu_without_vnni_is_refused(net, tmp_path, monkeypatch):
    path = net["int8"].export(tmp_path / "net.so")
    real = tb.host_isa()
    monkeypatch.setattr(tb, "host_isa", lambda: {"cpu": real["cpu"], "features": ["avx2"]})
    with pytest.raises(SnncError, match=r"net\.so.*(lacks|int8 spike convolutions)"):
        snnc.load(path)


def test_portable_export_and_bad_option(net):
    assert sc.spike_kernels("auto", tb.llvm_target(mcpu=None)) == "fp32"  # no VNNI in an any-x86 library
    with pytest.raises(SnncError, match="spike_convs='int4'"):
        snnc.compile(net["g"], target="tvm:llvm", mode="relax", spike_convs="int4")


def _same_from_threads(m, xs):
    """Each thread calls ``m`` on its own batch (own VM; AMX: the tile configuration is per thread,
    loaded by every parallel task) and gets what a serial call gets."""
    want = [m(x) for x in xs]
    got = [None] * len(xs)

    def work(i):
        for _ in range(3):
            got[i] = m(xs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return all(torch.equal(a, b) for a, b in zip(got, want))


@needs_int8
def test_int8_library_from_several_threads(net):
    assert _same_from_threads(net["int8"], [torch.rand(4, n, 3, 12, 12) * 2 for n in (1, 2, 3, 4)])


@needs_amx
@pytest.mark.parametrize("C,O,HW,k,pad", [(64, 32, 16, 3, 1), (128, 16, 18, 3, 0), (64, 48, 16, 1, 0)])
def test_amx_kernel_equals_the_vnni_kernel_bit_for_bit(C, O, HW, k, pad):
    """Both accumulate the same integers exactly (AMX's +128 weight offset is removed in int32)
    and apply the same fp32 epilogue, so their outputs are identical, and within the bound."""
    torch.manual_seed(3)
    conv = nn.Conv2d(C, O, k, padding=pad)
    x = (torch.rand(2, C, HW, HW) < 0.4).float()
    Ho = HW + 2 * pad - k + 1
    assert sc.amx_applies(C, Ho, 1)
    tgt = {**tb.llvm_target(), "mattr": sc.AMX_MATTR}
    lib = tb.build_kernels({"pack": sc.pack_kernel(C, HW, HW, pad),
                            "amx": sc.amx_conv_kernel(C, O, HW, HW, k, k, pad),
                            "vnni": sc.conv_kernel(C, O, HW, HW, k, k, 1, pad, "vnni")}, tgt)
    wq, scales, bias, bound = sc.pack_weights(conv)
    packed = torch.empty(2, C // 4, HW + 2 * pad, HW + 2 * pad, dtype=torch.int32)
    lib["pack"](x, packed)
    ys = {}
    for name, w in (("amx", sc.amx_weights(wq)), ("vnni", wq)):
        ys[name] = torch.empty(2, O, Ho, Ho)
        lib[name](packed, *(tvm.runtime.tensor(a) for a in (w, scales, bias)), ys[name])
    assert torch.equal(ys["amx"], ys["vnni"])
    want = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=pad)
    err = (ys["amx"].double() - want).abs().amax((0, 2, 3))
    assert (err <= torch.as_tensor(bound).double() + 4 * torch.finfo(torch.float32).eps * want.abs().amax((0, 2, 3))).all()


@needs_amx
def test_amx_library_uses_tiles_where_they_fit_and_matches_vnni():
    """64 -> 64 (fits a tile) on AMX, 64 -> 48 -> ... as well; 3 -> 64 stays fp32; the AMX library's
    outputs equal the VNNI library's (same integers) and agree with the reference."""
    g = unroll_timesteps(snnc.trace(_net((3, 64, 64, 48)), torch.zeros(1, 3, 16, 16)), T=2)
    mod = to_relax(_prepare(g, None), "cpu", batch="any", spike_convs="amx")
    script = mod["main"].script()
    assert script.count("R.call_tir(spike_conv2d_amx") == 2
    amx = snnc.compile(g, target="tvm:llvm", mode="relax")
    vnni = snnc.compile(g, target="tvm:llvm", mode="relax", spike_convs="vnni")
    assert amx.meta["spike_convs"] == "amx" and "+amx-int8" in amx.meta["tvm_target"]["mattr"]
    x = torch.rand(2, 3, 3, 16, 16) * 2
    assert torch.equal(amx(x), vnni(x))
    ref = snnc.compile(g, target="torch")(x)
    assert ref.mean() > 0.05 and (amx(x) == ref).float().mean() >= 0.999
    assert _same_from_threads(amx, [torch.rand(2, n, 3, 16, 16) * 2 for n in (1, 2, 3)])


def test_check_loadable_names_the_file(monkeypatch):
    monkeypatch.setattr(tb, "host_isa", lambda: {"cpu": "x", "features": ["avx2"]})
    with pytest.raises(SnncError, match="lib.so: built with vnni int8 spike convolutions"):
        sc.check_loadable({"spike_convs": "vnni"}, "lib.so")
    sc.check_loadable({"spike_convs": "fp32"}, "lib.so")  # fp32 libraries load anywhere


@needs_int8
def test_a_hybrid_module_exports_what_it_computes(net):
    """Default mode (hybrid, int8 spike convs in process on an int8 host): its export uses the int8
    spike kernels too; opting out (spike_int8=False) keeps both fp32."""
    assert snnc.compile(net["g"], target="tvm:llvm", mode="hybrid").meta["spike_convs"] == BEST
    assert snnc.compile(net["g"], target="tvm:llvm", mode="hybrid", spike_int8=False).meta["spike_convs"] == "fp32"
    assert snnc.compile(net["g"], target="tvm:llvm", mode="hybrid", spike_int8=True).meta["spike_convs"] == BEST
    assert snnc.compile(net["g"], target="tvm:llvm", mode="hybrid", spike_convs="auto").meta["spike_convs"] == BEST
