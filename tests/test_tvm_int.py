"""tvm:int: bit-exact against the integer reference (llvm and C source), no float in the
generated C, export/load round trip, clear errors."""
import re

import pytest
import torch
from torch import nn

import snnc
from snnc.fileio import bundle_bytes, read_bundle
from snnc.errors import FileFormatError, InputError, UnsupportedOp
from snnc.fileio import OverwriteError
from snnc.ops import IF, LIF, DirectEncoder, IntIF, ParametricLIF, Readout
from snnc.passes import quantize_integer, unroll_timesteps
from snnc.passes.quantize_integer import quantize_input
from snnc.report import firing_rates

pytest.importorskip("tvm")


class _Res(nn.Module):
    """Residual spikes (int.add), max pooling, a strict-compare zero-reset neuron, PLIF."""

    def __init__(self):
        super().__init__()
        self.enc, self.c1, self.n1 = DirectEncoder(), nn.Conv2d(2, 4, 3, padding=1, stride=1), IF(v_th=0.4)
        self.c2, self.n2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), LIF(tau=2.0, v_th=0.3, reset="zero", compare=">")
        self.pool, self.fc = nn.MaxPool2d(2), nn.Linear(4 * 9, 5)
        self.n3, self.out = ParametricLIF(init_tau=3.0, v_th=0.2), nn.Linear(5, 3)
        self.read = Readout("membrane")

    def forward(self, x):
        a = self.n1(self.c1(self.enc(x)))
        b = self.n2(self.c2(a) + a) + a   # current + spikes (aligned by a multiplier), spikes + spikes
        h = self.n3(self.fc(self.pool(b).flatten(1)))
        return self.read(self.out(h))


def _graphs():
    """(name, integer graph, input) triples covering every integer kernel and option."""
    torch.manual_seed(3)
    res = unroll_timesteps(snnc.trace(_Res(), torch.zeros(1, 2, 6, 6)), T=5)
    seq = unroll_timesteps(snnc.trace(nn.Sequential(nn.Linear(6, 8), LIF(tau=4.0, v_th=0.3, v_init=0.1), nn.Linear(8, 4),
                                                    IF(v_th=0.2)), torch.zeros(1, 6)), T=3)
    return [("res_fixed_per_channel", quantize_integer(res, leak="fixed", per_channel=True, state_bits=32),
             (torch.rand(7, 2, 6, 6) * 2 - 1,)),
            ("seq_shift_int4_16bit", quantize_integer(seq, weight_bits=4, state_bits=16, input_bits=4),
             (torch.rand(3, 9, 6) * 2 - 1,))]


@pytest.fixture(scope="module")
def compiled():
    out = []
    for name, q, (x,) in _graphs():
        xq = quantize_input(q, x)
        out.append((name, q, xq, {cg: snnc.compile(q, target="tvm:int", codegen=cg) for cg in ("llvm", "c")}))
    return out


def test_bit_exact_against_integer_reference(compiled):
    for name, q, xq, mods in compiled:
        ref = snnc.run(q, xq)
        assert ref.abs().sum() > 0, name
        for cg, m in mods.items():
            y = m(xq)
            assert y.dtype == ref.dtype and torch.equal(y, ref), (name, cg)
        bigger = torch.cat([xq, xq.flip(0)], dim=1 if q.snnc_spec["layout"] == "seq" else 0)
        assert torch.equal(mods["llvm"](bigger), snnc.run(q, bigger)), name  # any batch size


def test_spikes_are_bit_exact_too_and_float_graphs_are_quantized_first():
    g = unroll_timesteps(snnc.trace(nn.Sequential(DirectEncoder(), nn.Conv2d(1, 3, 3), LIF(tau=2.0, v_th=0.2)),
                                    torch.zeros(1, 1, 5, 5)), T=6)
    q = quantize_integer(g, weight_bits=6, leak="fixed")
    x = torch.rand(4, 1, 5, 5)
    xq = quantize_input(q, x)
    ref = snnc.run(q, xq)
    assert ref.dtype == torch.int8 and 0 < ref.float().mean() < 1
    m = snnc.compile(g, target="tvm:int", codegen="c", weight_bits=6, leak="fixed")  # quantizes g itself
    assert torch.equal(m.quantize_input(x), xq) and torch.equal(m(xq), ref) and torch.equal(m(x), ref)


def test_generated_c_has_no_floating_point(compiled):
    for name, q, xq, mods in compiled:
        src = mods["c"].c_source
        assert "int8_t" in src and "int64_t" in src and ">>" in src or name.startswith("seq")
        code = re.sub(r'"(\\.|[^"\\])*"', '""', src)          # drop string literals (error messages)
        code = re.sub(r"//[^\n]*|/\*.*?\*/", "", code, flags=re.S)
        code = "\n".join(l for l in code.splitlines() if not l.lstrip().startswith("#"))
        assert not re.findall(r"\b(float|double|half|_Float16|__fp16|__bf16|bfloat16|float[0-9]+_t)\b", code), name
        assert not re.findall(r"(?<![\w.])\d+\.\d*(?:[eE][+-]?\d+)?[fF]?\b|\b\d+[eE][+-]?\d+[fF]?\b", code), name
        assert not re.findall(r"\b(sqrt|exp|log|pow|floor|ceil|round|fabs|fmaxf?|fminf?)\s*\(", code), name
        assert mods["llvm"].c_source is None


def test_export_load_round_trip(compiled, tmp_path):
    for name, q, xq, mods in compiled:
        for cg, m in mods.items():
            path = m.export(tmp_path / f"{name}_{cg}.tar")
            with pytest.raises(OverwriteError):
                m.export(path)
            m2 = snnc.load(path)
            assert m2.codegen == cg and torch.equal(m2(xq), m(xq))
            assert (m2.c_source is not None) == (cg == "c")
            assert m2.meta["integer"]["weight_bits"] == q.snnc_integer["weight_bits"]
    bad = tmp_path / "bad.tar"  # hashes right, the artefact inside not a tar
    meta, files = read_bundle(path)
    meta.pop("files")
    bad.write_bytes(bundle_bytes(meta, {meta["artefact"]: b"not a tar at all"}))
    with pytest.raises(FileFormatError, match=r"bad.tar \[module.tar\] is not a readable tvm:int artefact"):
        snnc.load(bad)


def test_clear_errors(compiled):
    name, q, xq, mods = compiled[0]
    with pytest.raises(InputError, match="int8"):
        mods["llvm"](xq.to(torch.int16))
    float_graph = unroll_timesteps(snnc.trace(nn.Sequential(nn.Linear(4, 2), IF()), torch.zeros(1, 4)), T=2)
    bn = unroll_timesteps(snnc.trace(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), IF()), torch.zeros(2, 4)), T=2)
    with pytest.raises(UnsupportedOp, match=r"node %_1 .*nn.batch_norm.*fold_bn"):
        snnc.compile(bn, target="tvm:int")
    with pytest.raises(snnc.SnncError, match="already integer IR"):
        snnc.compile(q, target="tvm:int", weight_bits=4)
    q2 = quantize_integer(float_graph)
    node = next(n for n in q2.graph.nodes if n.op == "call_module")
    with q2.graph.inserting_after(node):
        neg = q2.graph.call_function(torch.neg, (node,))
    node.replace_all_uses_with(neg)
    neg.args = (node,)
    q2.recompile()
    snnc.annotate(q2)
    with pytest.raises(UnsupportedOp, match=r"node %neg .*has no integer kernel; supported: .*int.conv2d"):
        snnc.compile(q2, target="tvm:int")
    with pytest.raises(snnc.SnncError, match="codegen"):
        snnc.compile(q, target="tvm:int", codegen="cuda")


@pytest.mark.parametrize("neuron,leak,codegen", [
    (LIF(tau=4.0, v_th=3.0), "shift", "llvm"),                                   # floor shift on negatives
    (LIF(tau=2.0, v_th=3.0, reset="zero", v_reset=-2.0, compare=">"), "fixed", "c"),  # round half up
    (LIF(tau=2.0, v_th=4.0, v_leak=-3.0, v_init=2.0), "shift", "c"),             # leak towards v_leak
])
def test_neuron_kernels_on_small_membranes(neuron, leak, codegen):
    """Inputs straight into one neuron layer on scale 1, so every rounding of the leak shows up
    in the spikes."""
    g = unroll_timesteps(snnc.trace(nn.Sequential(neuron), torch.zeros(1, 64)), T=24)
    q = quantize_integer(g, leak=leak, state_bits=16, input_range=127.0)
    xq = quantize_input(q, torch.randint(-9, 12, (24, 8, 64)).float())
    ref = snnc.run(q, xq)
    assert 0.05 < ref.float().mean() < 0.95
    assert torch.equal(snnc.compile(q, target="tvm:int", codegen=codegen)(xq), ref)


@pytest.mark.parametrize("codegen", ["llvm", "c"])
def test_saturation_in_the_kernels(codegen):
    """A hand-built integer graph (past quantize_integer's checks) whose 16-bit membranes
    saturate on both sides: the kernels must clamp exactly like the reference."""
    T_, th = 16, 20000
    g = snnc.trace(nn.Sequential(IntIF(v_th=th, state_bits=16)), torch.zeros(T_, 4, 32, dtype=torch.int32))
    g.snnc_integer = {"weight_bits": 8}
    x = torch.randint(-30000, 30001, (T_, 4, 32), dtype=torch.int32)
    delta = torch.arange(16) - 8
    x[:2, :, :16] = -30000                      # H = -60000 saturates to -32768 ...
    x[2, :, :16] = 32768 + th + delta           # ... so step 2 fires exactly when delta >= 0
    x[:2, :, 16:] = 30000                       # H = 60000 saturates to 32767, fires, V = 12767 ...
    x[2, :, 16:] = th - 12767 + delta           # ... so step 2 fires exactly when delta >= 0
    ref = snnc.run(g, x)
    assert torch.equal(ref[2, 0].long(), (torch.cat([delta, delta]) >= 0).long())
    assert torch.equal(snnc.compile(g, target="tvm:int", codegen=codegen)(x), ref)


def _digits_int_graph(width, T, epochs):
    from int_nets import ann, convert_by_max, train, unrolled

    from snnc.data import digits
    d = digits()
    model = ann(width)
    if epochs:
        model = train(model, d, epochs=epochs)
    g = unrolled(convert_by_max(model.eval(), d.x_train if epochs else d.x_train[:256]), T)
    return d, g, quantize_integer(g)


def test_bit_exact_on_the_digits_test_set():
    d, _, q = _digits_int_graph(width=4, T=4, epochs=0)   # calibrated but untrained: spikes, not accuracy
    xq = quantize_input(q, d.x_test)
    ref = snnc.run(q, xq)
    y = snnc.compile(q, target="tvm:int")(xq)
    assert len(xq) == 450 and torch.equal(y, ref)


@pytest.mark.slow
def test_trained_digits_bit_exact_and_accurate_llvm_and_c():
    d, g, q = _digits_int_graph(width=8, T=32, epochs=15)
    xq = quantize_input(q, d.x_test)
    ref = snnc.run(q, xq)
    float_acc = (snnc.run(g, d.x_test).argmax(-1) == d.y_test).float().mean().item() * 100
    for cg in ("llvm", "c"):
        y = snnc.compile(q, target="tvm:int", codegen=cg)(xq)
        assert torch.equal(y, ref), cg
        acc = (y.argmax(-1) == d.y_test).float().mean().item() * 100
        assert float_acc > 90 and abs(acc - float_acc) <= 1.0, (cg, acc, float_acc)


# --- int8 VNNI kernels (tvm_int_vnni.py) ------------------------------------------------------

from snnc.targets.tvm_int_vnni import int8_isa  # noqa: E402

needs_vnni = pytest.mark.skipif(int8_isa() is None, reason="this CPU has no AVX-512 VNNI")


def _vnni_kernels(m):
    return [st["kernel"] for st in m.plan["steps"] if st["op"] == "kernel" and "_weight_vnni" in " ".join(st["params"])]


@pytest.fixture(scope="module")
def converted_cnn():
    """A converted digits CNN (conv-IF x2, sum pool, linear-IF, linear, readout) whose every
    neuron layer fires, compiled with the VNNI kernels and with the portable ones."""
    d, _, q = _digits_int_graph(width=8, T=6, epochs=0)
    xq = quantize_input(q, d.x_test[:64])
    return q, xq


@needs_vnni
def test_vnni_kernels_bit_exact_on_a_converted_cnn_with_every_layer_firing(converted_cnn):
    q, xq = converted_cnn
    rates = firing_rates(q, xq)
    assert len(rates) == 3 and all(0.005 < r < 0.9 for r in rates), rates
    ref = snnc.run(q, xq)
    m = snnc.compile(q, target="tvm:int")
    assert m.meta["int8_isa"] == "avx512_vnni" and m.isa == "avx512_vnni"
    assert len(_vnni_kernels(m)) == 4            # both convs (signed input, spikes) and both linears
    assert torch.equal(m(xq), ref)
    assert torch.equal(m(xq[3:10]), snnc.run(q, xq[3:10]))   # another batch, an unaligned slice


def test_forced_portable_isa_is_bit_exact_and_uses_no_vnni(converted_cnn):
    q, xq = converted_cnn
    m = snnc.compile(q, target="tvm:int", isa="portable")
    assert m.meta["int8_isa"] == "portable" and not _vnni_kernels(m) and "vpdpbusd" not in m.tir_source
    assert torch.equal(m(xq), snnc.run(q, xq))
    with pytest.raises(snnc.SnncError, match="isa='avx2'"):
        snnc.compile(q, target="tvm:int", isa="avx2")
    with pytest.raises(snnc.SnncError, match="needs codegen='llvm'"):
        snnc.compile(q, target="tvm:int", isa="avx512_vnni", codegen="c")


@needs_vnni
def test_export_load_at_another_batch_and_fallback_on_a_cpu_without_vnni(converted_cnn, tmp_path, monkeypatch):
    q, xq = converted_cnn
    m = snnc.compile(q, target="tvm:int")
    path = m.export(tmp_path / "digits.snnc")
    x2 = xq[:5]
    ref = snnc.run(q, x2)
    m2 = snnc.load(path)
    assert m2.meta["int8_isa"] == "avx512_vnni" and _vnni_kernels(m2) and torch.equal(m2(x2), ref)
    from snnc.targets import tvm_int
    monkeypatch.setattr(tvm_int, "int8_isa", lambda: None)     # the file moved to a CPU without VNNI
    m3 = snnc.load(path)
    assert m3.meta["int8_isa"] == "portable" and not _vnni_kernels(m3)
    assert torch.equal(m3(x2), ref) and torch.equal(m3(xq), snnc.run(q, xq))


@needs_vnni
def test_vnni_module_called_from_threads(converted_cnn):
    from concurrent.futures import ThreadPoolExecutor
    q, xq = converted_cnn
    m = snnc.compile(q, target="tvm:int")
    parts = [xq[i::4] for i in range(4)]
    refs = [snnc.run(q, p) for p in parts]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda p: m(p), parts * 3))
    assert all(torch.equal(o, refs[i % 4]) for i, o in enumerate(outs))


@needs_vnni
@pytest.mark.parametrize("C,O,H,W,k,s,p", [(5, 20, 7, 9, 3, 2, 1), (3, 16, 6, 5, 1, 1, 0), (8, 33, 11, 13, 5, 1, 2)])
def test_vnni_conv_edges_full_int8_range(C, O, H, W, k, s, p):
    """Odd channel counts (padding to 4 / 16), strides, prime widths, weights and inputs over the
    whole int8 range (-128 included): the offset-128 path must give the exact int32 sums."""
    from snnc.ops import IntConv2d, IntLinear
    torch.manual_seed(C * O)
    conv = IntConv2d(torch.randint(-127, 128, (O, C, k, k)), torch.randint(-10 ** 6, 10 ** 6, (O,)), s, p)
    lin = IntLinear(torch.randint(-127, 128, (19, C * H * W)), None)
    for mod, shape in ((conv, (2, C, H, W)), (nn.Sequential(nn.Flatten(), lin), (2, C, H, W))):
        g = snnc.trace(nn.Sequential(mod) if isinstance(mod, IntConv2d) else mod, torch.zeros(shape, dtype=torch.int8))
        g.snnc_integer = {"weight_bits": 8}
        x = torch.randint(-128, 128, (11, C, H, W), dtype=torch.int8)
        x[0] = -128
        x[1] = 127
        m = snnc.compile(g, target="tvm:int")
        assert _vnni_kernels(m) and torch.equal(m(x), snnc.run(g, x))


def test_charge_dtype_is_int32_only_where_nothing_can_wrap():
    from snnc.ops import IntLIF
    from snnc.targets.tvm_int_lower import _charge_dtype
    n = IntIF(v_th=100, state_bits=24)
    assert _charge_dtype(n, 10 ** 6) == "int32" and _charge_dtype(n, None) == "int64"
    assert _charge_dtype(n, 2 ** 31 - 2 ** 23) == "int64"
    fixed = IntLIF(v_th=100, leak="fixed", decay_q=3000, frac_bits=12, state_bits=24)
    assert _charge_dtype(fixed, 10) == "int64"        # 2**24 * 3000 overflows int32
    assert _charge_dtype(IntLIF(v_th=100, leak="fixed", decay_q=3000, frac_bits=12, state_bits=16), 10) == "int32"


@needs_vnni
@pytest.mark.parametrize("leak,per_channel", [("shift", False), ("fixed", True)])
def test_fused_conv_lif_over_time_bit_exact(leak, per_channel):
    """A spikingjelly-style multi-step conv SNN fed a different frame each step: both convs run on
    all T*N frames and carry their LIF layer (leak, zero reset, strict compare) in the kernel."""
    torch.manual_seed(5)
    net = nn.Sequential(nn.Conv2d(2, 20, 3, padding=1), LIF(tau=2.0, v_th=0.3),
                        nn.Conv2d(20, 8, 3, stride=2), LIF(tau=4.0, v_th=0.2, reset="zero", compare=">"))
    g = unroll_timesteps(snnc.trace(net, torch.zeros(1, 2, 9, 9)), T=6)
    q = quantize_integer(g, leak=leak, per_channel=per_channel)
    xq = quantize_input(q, torch.rand(6, 5, 2, 9, 9) * 2 - 0.5)
    ref = snnc.run(q, xq)
    m = snnc.compile(q, target="tvm:int")
    assert sum(st["kernel"].endswith("_fused") for st in m.plan["steps"] if st["op"] == "kernel") == 2
    assert 0.01 < ref.float().mean() < 0.9 and torch.equal(m(xq), ref)
