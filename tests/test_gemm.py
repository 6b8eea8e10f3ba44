"""snnc.ops.gemm: Linear layers on the raced GEMM backend (MKL / oneDNN, float32) or the opt-in
bfloat16 GEMM. Outputs and all three gradients against float64 within the stated bounds, the
race's recorded picks, the Open Neuromorphic task against a float64 loop, and bad arguments."""
import pytest
import torch
from torch import nn

import snnc
from snnc import report as snnc_report
from snnc.errors import SnncError
from snnc.ops import LIF, gemm, native
from snnc.ops.gemm import fast_linears
from snnc.passes import insert_surrogate, unroll_timesteps
from test_training_fused import _AtanSpike  # noqa: E402  (atan surrogate, alpha = 2, written out in float64)

BACKENDS = [None, "mkl"] + (["onednn"] if gemm._onednn_ok() else [])


def _abs_products(a, b):
    """``sum_k |a_k b_k|`` for every output of ``a @ b.T``: the scale of the rounding bounds."""
    return a.double().abs() @ b.double().abs().t()


def _run(precision, backend, seed=0, shape=(6, 5, 96), out_features=40):
    torch.manual_seed(seed)
    lin = nn.Linear(shape[-1], out_features)
    x = (torch.randn(*shape) * 2).requires_grad_()
    gy = torch.randn(*shape[:-1], out_features)
    net = fast_linears(nn.Sequential(lin), precision=precision, backend=backend)
    y = net(x)
    y.backward(gy)
    return lin, x, gy, y


def _reference(lin, x, gy):
    x64 = x.detach().double().requires_grad_()
    w64, b64 = lin.weight.detach().double().requires_grad_(), lin.bias.detach().double().requires_grad_()
    y64 = x64 @ w64.t() + b64
    y64.backward(gy.double())
    return y64, x64.grad, w64.grad, b64.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_outputs_and_gradients_within_float32_rounding_of_float64(backend):
    gemm.clear_picks()
    lin, x, gy, y = _run("float32", backend)
    y64, gx64, gw64, gb64 = _reference(lin, x, gy)
    u = 2.0 ** -24
    x2, g2 = x.detach().reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
    # |error| <= K u sum|a b| per output (K: the reduction length), plus the bias' own rounding
    checks = [(y, y64, _abs_products(x2, lin.weight.detach()).reshape(y.shape) + y64.abs(), x.shape[-1] + 1),
              (x.grad, gx64, _abs_products(g2, lin.weight.detach().t()).reshape(x.shape), lin.out_features),
              (lin.weight.grad, gw64, _abs_products(g2.t(), x2.t()), x2.shape[0]),
              (lin.bias.grad, gb64, g2.double().abs().sum(0), g2.shape[0])]
    for got, ref, scale, k in checks:
        assert float(ref.detach().abs().max()) > 1.0
        err = (got.detach().double() - ref).abs()
        assert bool((err <= k * u * scale + 1e-30).all()), float((err / scale).max())
    assert torch.isfinite(y).all()


def test_mkl_backend_forward_is_bit_identical_to_nn_linear():
    lin, x, gy, y = _run("float32", "mkl")
    assert torch.equal(y, nn.functional.linear(x.detach(), lin.weight, lin.bias))


def test_race_records_a_pick_per_gemm_and_reuses_it(monkeypatch):
    gemm.clear_picks()
    _run("float32", None, shape=(8, 4, 64), out_features=32)
    picks = gemm.picks()
    threads = torch.get_num_threads()
    assert set(picks) == {f"forward 32x64x32 t{threads}", f"input_grad 32x32x64 t{threads}",
                          f"weight_grad 32x32x64 t{threads}"}
    assert set(picks.values()) <= set(gemm.BACKENDS)
    # a recorded pick is used as is: no second race
    monkeypatch.setattr(snnc_report, "fastest", lambda fns, rounds: pytest.fail("raced twice"))
    _run("float32", None, shape=(8, 4, 64), out_features=32)
    monkeypatch.setenv("SNNC_GEMM", "mkl")   # $SNNC_GEMM forces a backend, no race either
    gemm.clear_picks()
    _run("float32", None, shape=(8, 4, 64), out_features=32)
    assert gemm.picks() == {}


@pytest.mark.skipif(not gemm.bf16_native(), reason="no native bfloat16 (AVX512_BF16 / AMX) on this CPU")
def test_bfloat16_opt_in_is_within_its_stated_bound_and_is_really_bfloat16():
    lin, x, gy, y = _run("bfloat16", None)
    y64, gx64, gw64, gb64 = _reference(lin, x, gy)
    x2, g2 = x.detach().reshape(-1, x.shape[-1]), gy.reshape(-1, gy.shape[-1])
    bound = 2.0 ** -6
    checks = [(y, y64, _abs_products(x2, lin.weight.detach()).reshape(y.shape) + y64.abs()),
              (x.grad, gx64, _abs_products(g2, lin.weight.detach().t()).reshape(x.shape)),
              (lin.weight.grad, gw64, _abs_products(g2.t(), x2.t()))]
    for got, ref, scale in checks:
        rel = (got.detach().double() - ref.detach()).abs() / scale.detach()
        assert float(rel.max()) <= bound
        assert float(rel.max()) > 96 * 2.0 ** -24   # beyond any float32 bound here: bf16 did run
    torch.testing.assert_close(lin.bias.grad.double(), gb64, rtol=1e-5, atol=1e-5)   # float32 sum


def _on_task(precision, backend, layout="auto", input_grad=False, grad_out=None):
    """The Open Neuromorphic task, small (Linear + LIF over T, ``output.sum().backward()``, or
    ``(output * grad_out).sum()``): ``(out, float64 spikes, lin, float64 lin, x, float64 x)``."""
    T, B, n = 60, 4, 48
    torch.manual_seed(0)
    proto, x = nn.Linear(n, n), (torch.randn(T, B, n) * 2).requires_grad_(input_grad)
    g = insert_surrogate(unroll_timesteps(snnc.trace(nn.Sequential(proto, LIF(tau=2.0)), torch.zeros(B, n)), T=T),
                         kind="atan").train()
    fast_linears(g, precision=precision, backend=backend, layout=layout)
    out = g(x)
    (out.sum() if grad_out is None else (out * grad_out).sum()).backward()
    ref_lin = nn.Linear(n, n).double()
    ref_lin.load_state_dict(proto.state_dict())
    x64 = x.detach().double().requires_grad_(input_grad)
    y, v, spikes = ref_lin(x64), torch.zeros(B, n, dtype=torch.float64), []
    for t in range(T):   # float64 loop differentiated as written
        v = 0.5 * v + y[t]
        s = _AtanSpike.apply(v - 1.0)
        v = v - s
        spikes.append(s)
    spikes = torch.stack(spikes)
    (spikes.sum() if grad_out is None else (spikes * grad_out.double()).sum()).backward()
    lin = next(m for m in g.modules() if isinstance(m, nn.Linear))
    return out, spikes.detach(), lin, ref_lin, x, x64


@pytest.mark.parametrize("layout", gemm.LAYOUTS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_open_neuromorphic_task_with_raced_gemm_equals_float64_loop(backend, layout):
    out, ref, lin, ref_lin, _, _ = _on_task("float32", backend, layout)
    assert 0.05 < float(out.detach().mean()) < 0.95 and (out.double() != ref).float().mean() < 1e-3
    torch.testing.assert_close(lin.weight.grad.double(), ref_lin.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lin.bias.grad.double(), ref_lin.bias.grad, rtol=1e-4, atol=1e-4)
    assert float(ref_lin.weight.grad.abs().max()) > 1.0
    # "auto": the Linear wrote y^T ([features, T*B] in memory) and the scan's spikes kept it
    feature_major = native.load() is not None and layout == "auto"
    assert native.feature_major(out) == feature_major and out.is_contiguous() != feature_major


@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_major_input_gradient_and_dense_grad_out_equal_float64_loop(backend):
    if native.load() is None:
        pytest.skip(f"native kernels unavailable: {native._state['error']}")
    gemm.clear_picks()
    grad_out = torch.randn(60, 4, 48)   # a time-major dL/dS: copied into the scan's layout
    out, ref, lin, ref_lin, x, x64 = _on_task("float32", backend, "auto", input_grad=True, grad_out=grad_out)
    assert native.feature_major(out) and (out.double() != ref).float().mean() < 1e-3
    assert float(x64.grad.abs().max()) > 0.5
    for got, want in ((x.grad, x64.grad), (lin.weight.grad, ref_lin.weight.grad), (lin.bias.grad, ref_lin.bias.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    if backend is None:   # the three feature-major GEMMs were raced on their own shapes
        assert {k.split()[0] for k in gemm.picks()} >= {"forward_fm", "input_grad_fm", "weight_grad_fm"}


def test_feature_major_layout_only_where_a_native_scan_reads_it():
    """A Linear that feeds something other than a native scan (here a second Linear, or a neuron
    under the "standard" layout or without autograd) keeps the row-major output."""
    torch.manual_seed(0)
    T, B, n = 8, 3, 16
    net = nn.Sequential(nn.Linear(n, n), nn.Linear(n, n), LIF(tau=2.0))
    g = insert_surrogate(unroll_timesteps(snnc.trace(net, torch.zeros(B, n)), T=T), kind="atan").train()
    fast_linears(g)
    seen = []
    for m in g.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, a, y: seen.append(native.feature_major(y)))
    x = torch.randn(T, B, n)
    g(x).sum().backward()
    with torch.no_grad():
        g(x)
    assert seen == [False, native.load() is not None, False, False]


@pytest.mark.skipif(not gemm.bf16_native(), reason="no native bfloat16 (AVX512_BF16 / AMX) on this CPU")
def test_open_neuromorphic_task_bfloat16_spike_agreement_and_gradient_error():
    out, ref, lin, ref_lin, _, _ = _on_task("bfloat16", None)
    agreement = float((out.double() == ref).double().mean())
    assert agreement >= 0.99, agreement
    err = (lin.weight.grad.double() - ref_lin.weight.grad).norm() / ref_lin.weight.grad.norm()
    assert float(err) < 0.05, float(err)   # flipped spikes move the surrogate terms of their neuron


def test_native_scan_split_over_two_threads_equals_one_thread():
    if native.load() is None:
        pytest.skip(f"native kernels unavailable: {native._state['error']}")
    from snnc.ops.neuron_scan import _native_plan
    from snnc.ops.surrogate import make_surrogate
    x = torch.randn(256, 4, 1100) * 2   # 1.1M elements: two threads (whole 512-neuron blocks + a tail)
    lib, p = _native_plan(LIF(tau=2.0), x, make_surrogate("atan"))
    gs = torch.randn(x.shape)
    threads = torch.get_num_threads()
    outs = []
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            s, s8, z = native.scan_forward(lib, x, p)
            outs.append((s, z, native.scan_backward(lib, z, s8, gs, p, "atan", 2.0)))
    finally:
        torch.set_num_threads(threads)
    assert float(outs[0][0].mean()) > 0.05
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_native_scan_feature_major_equals_time_major_bit_for_bit():
    """The C scan on a ``[F, T, B]``-in-memory input (rows of B lanes) gives the time-major
    results exactly (same ops per neuron), on one and two threads, in that layout."""
    if native.load() is None:
        pytest.skip(f"native kernels unavailable: {native._state['error']}")
    from snnc.ops.neuron_scan import _native_plan
    from snnc.ops.surrogate import make_surrogate
    torch.manual_seed(0)
    x = torch.randn(300, 5, 1100) * 2   # 1.65M elements: split over two threads mid-row (5 lanes a row)
    xf = x.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    assert native.feature_major(xf) and not native.time_major(xf)
    gs = torch.randn(x.shape)
    threads = torch.get_num_threads()
    try:
        for t, neuron, half in ((1, LIF(tau=2.0), False), (2, LIF(tau=2.0), False),
                                (2, LIF(tau=2.0, reset="zero", v_reset=-0.2), True)):   # + float16 z
            lib, p = _native_plan(neuron, x, make_surrogate("atan"))
            torch.set_num_threads(t)
            s, s8, z = native.scan_forward(lib, x, p, half_state=half)
            sf, s8f, zf = native.scan_forward(lib, xf.clone(), p, half_state=half, overwrite_input=True)
            assert sf.stride() == zf.stride() == xf.stride() and float(s.mean()) > 0.05
            assert torch.equal(s, sf) and torch.equal(s8, s8f) and torch.equal(z, zf)
            for grad in (gs, torch.ones(()).expand(x.shape)):
                gx, gxf = native.scan_backward(lib, z, s8, grad, p, "atan", 2.0), native.scan_backward(lib, zf, s8f, grad, p, "atan", 2.0)
                assert gxf.stride() == xf.stride() and torch.equal(gx, gxf)
    finally:
        torch.set_num_threads(threads)


def test_bad_arguments_are_named(monkeypatch):
    with pytest.raises(SnncError, match="precision"):
        fast_linears(nn.Linear(2, 2), precision="float16")
    with pytest.raises(SnncError, match="backend"):
        fast_linears(nn.Linear(2, 2), backend="cublas")
    with pytest.raises(SnncError, match="layout"):
        fast_linears(nn.Linear(2, 2), layout="transposed")
    monkeypatch.setenv("SNNC_GEMM", "blas")
    with pytest.raises(SnncError, match=r"\$SNNC_GEMM"):
        fast_linears(nn.Linear(2, 2))
    monkeypatch.setattr(gemm, "bf16_native", lambda: False)
    monkeypatch.delenv("SNNC_GEMM")
    with pytest.raises(SnncError, match="native bfloat16"):
        fast_linears(nn.Linear(2, 2), precision="bfloat16")


def test_retrain_routes_linears_while_training_only():
    """``retrain`` (default ``linears="float32"``) runs the Linears on the raced GEMMs, the one
    feeding a LIF through time.split feature-major, and leaves plain ``nn.Linear``s behind;
    ``linears="exact"`` never routes them."""
    from snnc.data import digits, loader
    from snnc.zoo import digits_snn
    d = digits()
    data = loader(d.x_train[:64], d.y_train[:64], 32)
    g = insert_surrogate(unroll_timesteps(snnc.trace(digits_snn(4), torch.zeros(2, 1, 8, 8)), T=4), kind="atan")
    lin = [m for m in g.modules() if isinstance(m, nn.Linear)]
    seen = []
    lin[0].register_forward_hook(lambda m, a, y: seen.append((native.feature_major(y), torch.is_grad_enabled())))
    gemm.clear_picks()
    hist = snnc.retrain(g, data, epochs=1, lr=1e-2, progress=False)
    assert hist[0]["loss"] > 0 and len(seen) == 2
    assert all(fm == (native.load() is not None) for fm, grad in seen)   # both training steps
    assert {k.split()[0] for k in gemm.picks()} >= {"forward", "forward_fm", "weight_grad_fm"}
    assert not any(hasattr(m, gemm._HOOK_ATTR) or gemm._enter in m._forward_pre_hooks.values() for m in lin)
    x = torch.randn(5, lin[0].in_features)
    assert torch.equal(lin[0](x), nn.functional.linear(x, lin[0].weight, lin[0].bias))
    seen.clear()
    gemm.clear_picks()
    snnc.retrain(g, data, epochs=1, lr=1e-2, progress=False, linears="exact")
    assert [fm for fm, _ in seen] == [False, False] and gemm.picks() == {}
    fast_linears(lin[1])   # routed before: kept (and its settings) after the block
    with gemm.routed_linears(g):
        pass
    assert gemm._enter in lin[1]._forward_pre_hooks.values() and not hasattr(lin[0], gemm._HOOK_ATTR)
    with pytest.raises(SnncError, match="linears"):
        snnc.retrain(g, data, linears="bfloat16")
