"""The fused neuron scan's training path: gradients against float64 autograd through the
reference neuron, what it keeps for backward (bytes, dtypes: counted, not timed), the uint8 spike
inputs of the next layer's weight gradient, and the Open Neuromorphic task's gradients against a
plain torch loop and against spikingjelly's own run."""
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

import snnc
from snnc.ops import IF, LIF, native, spike_store
from snnc.ops.neuron_scan import _native_plan, step_loop
from snnc.ops.surrogate import make_surrogate
from snnc.passes import insert_surrogate, unroll_timesteps
from snnc.training import scan_state

_PACK = spike_store._pack
KINDS = ("rectangular", "sigmoid", "atan", "triangle")
# decays and inputs that are dyadic: the float32 forward is exact, so its spikes equal float64's
NEURONS = {
    "lif_subtract": lambda: LIF(tau=2.0),
    "if_zero": lambda: IF(v_th=0.75, reset="zero", v_reset=-0.125),
    "lif_zero_strict": lambda: LIF(decay=0.75, reset="zero", compare=">"),
    "lif_decay_input": lambda: LIF(tau=2.0, decay_input=True, v_th=0.5),
}


def _native_or_skip():
    if native.load() is None:
        pytest.skip(f"native kernels unavailable: {native._state['error']}")


def _neuron(name, kind):
    n = NEURONS[name]()
    n.surrogate, n.step_mode = make_surrogate(kind), "m"
    return n


def _dyadic(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 200, shape, generator=g).float() / 128   # k/128: exact in float32


@pytest.mark.parametrize("name", sorted(NEURONS))
@pytest.mark.parametrize("kind", KINDS)
def test_native_fused_gradient_equals_float64_autograd_through_the_reference_neuron(name, kind):
    _native_or_skip()
    neuron = _neuron(name, kind)
    x = _dyadic(8, 3, 700)   # > one 512-neuron block, ragged tail
    gy = torch.randn(8, 3, 700, generator=torch.Generator().manual_seed(1))
    x32 = x.clone().requires_grad_()
    assert _native_plan(neuron, x32, neuron.surrogate) is not None
    y32 = neuron(x32)
    (g32,) = torch.autograd.grad(y32, x32, gy)
    x64 = x.double().requires_grad_()
    y64 = step_loop(neuron, x64)   # T calls of neuron.step under autograd, float64
    (g64,) = torch.autograd.grad(y64, x64, gy.double())
    assert 0.05 < float(y64.detach().mean()) < 0.95 and torch.equal(y32.double(), y64)
    assert float(g64.abs().max()) > 0.1
    # float32 rounding of g(z) and of the T-step recurrence only
    torch.testing.assert_close(g32.double(), g64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", sorted(NEURONS))
@pytest.mark.parametrize("kind", KINDS)
def test_float16_state_gradient_is_within_the_stated_bound_of_float64(name, kind):
    _native_or_skip()
    neuron = _neuron(name, kind)
    x = _dyadic(8, 3, 700, seed=2)
    gy = torch.randn(8, 3, 700, generator=torch.Generator().manual_seed(3))
    x64 = x.double().requires_grad_()
    (g64,) = torch.autograd.grad(step_loop(neuron, x64), x64, gy.double())
    grads = []
    for use_native in (True, False):
        x16 = x.clone().requires_grad_()
        with scan_state("float16"):
            plan = _native_plan(neuron, x16, neuron.surrogate) if use_native else None
            y = neuron(x16) if use_native else _torch_only(neuron, x16)
        assert (plan is not None) == use_native
        assert torch.equal(y.double(), step_loop(neuron, x.double()))   # forward unchanged
        grads.append(torch.autograd.grad(y, x16, gy)[0])
    # native and torch fallback round z to half the same way
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    # stated bound: |dL/dX - exact| <= 2^-8 * max|exact| (z rounded to 11 bits; measured <= 2^-10)
    err = float((grads[0].double() - g64).abs().max())
    assert err <= 2 ** -8 * float(g64.abs().max()), err


def _torch_only(neuron, x):
    import os
    old = os.environ.get("SNNC_NATIVE")
    os.environ["SNNC_NATIVE"] = "0"
    try:
        from snnc.ops.neuron_scan import _NeuronScan
        return _NeuronScan.apply(x, neuron, neuron.surrogate)
    finally:
        os.environ.pop("SNNC_NATIVE") if old is None else os.environ.__setitem__("SNNC_NATIVE", old)


def _conv_net(T=4):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), LIF(tau=2.0), nn.Conv2d(8, 16, 3, padding=1),
                        LIF(tau=2.0, reset="zero"), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16 * 9, 5))
    with torch.no_grad():
        net[2].weight.mul_(4.0)   # the second layer fires too
    return insert_surrogate(unroll_timesteps(snnc.trace(net, torch.zeros(3, 2, 6, 6)), T=T), kind="atan").train()


class _Recorder:
    """What autograd saves during a forward, as ``spike_store`` packs it (``compact=False``: as
    plain torch saves it); ``held()``: the saved tensors the graph still holds (weak references)."""

    def __init__(self, monkeypatch, compact=True):
        self.refs = []
        pack = _PACK

        def recording_pack(t):
            p = pack(t) if compact else t
            self.refs.append(weakref.ref(p))
            return p
        monkeypatch.setattr(spike_store, "_pack", recording_pack)

    def held(self):
        gc.collect()
        objs = [r() for r in self.refs]
        return [o.u8 if type(o) is spike_store._Packed else o for o in objs if o is not None]


@pytest.mark.parametrize("state", ("float32", "float16"))
def test_saved_for_backward_are_uint8_spikes_and_one_membrane_tensor(monkeypatch, state):
    g, T, N = _conv_net(), 4, 3
    n1, n2 = T * N * 8 * 36, T * N * 16 * 36            # neuron-steps of the two LIF layers
    x = torch.rand(T, N, 2, 6, 6) * 3
    rec = _Recorder(monkeypatch)
    with scan_state(state):
        out = g(x)
    params = {p.untyped_storage().data_ptr() for p in g.parameters()}
    held = {t.untyped_storage().data_ptr(): t for t in rec.held() if t.untyped_storage().data_ptr() not in params}
    zdtype = getattr(torch, state)
    zs = [t for t in held.values() if t.dtype == zdtype and t.dim() == 5 and t.shape[:2] == (T, N)]
    assert sorted(z.numel() for z in zs) == [n1, n2]                 # one z per scan, in its dtype
    u8 = [t for t in held.values() if t.dtype == torch.uint8]
    assert sorted(t.untyped_storage().nbytes() for t in u8) == [n1, n2]   # spikes: 1 byte each
    assert not [t for t in held.values() if t.dtype == torch.float32 and t.numel() in (n1, n2)
                and not any(t is z for z in zs)]                      # no float32 spikes held
    # everything held: network input (conv1), z, uint8 spikes, max-pool indices, the linear's input
    nbytes = sum(t.untyped_storage().nbytes() for t in held.values())
    z_bytes = 2 if state == "float16" else 4
    assert nbytes == 4 * T * N * 2 * 36 + (z_bytes + 1) * (n1 + n2) + 8 * T * N * 144 + 4 * T * N * 144
    out.sum().backward()


@pytest.mark.parametrize("chunk_bytes", (None, 2048))
def test_weight_gradients_from_uint8_spikes_equal_plain_torch(monkeypatch, chunk_bytes):
    """dW of conv2 and linear-free layers from the uint8 spikes (in row chunks) vs the graph run
    without snnc's hooks (torch's own conv backward on float32 spikes) and vs float64."""
    from snnc.ops import spike_layers
    if chunk_bytes:
        monkeypatch.setattr(spike_layers, "CHUNK_BYTES", chunk_bytes)   # 2 KiB: many chunks
    g = _conv_net()
    x = torch.rand(4, 3, 2, 6, 6) * 3
    g(x).square().sum().backward()
    ours = [p.grad.clone() for p in g.parameters()]
    g.zero_grad(set_to_none=True)
    with _no_hooks(g):
        g(x).square().sum().backward()
    plain = [p.grad.clone() for p in g.parameters()]
    assert all(float(p.abs().sum()) > 0 for p in ours)
    if chunk_bytes is None:
        assert all(torch.equal(a, b) for a, b in zip(ours, plain))
    else:   # the same products summed in another order
        for a, b in zip(ours, plain):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_spike_input_linear_backward_matches_float64():
    from snnc.ops.spike_layers import spike_input_hook
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 30), LIF(tau=2.0), nn.Linear(30, 7))
    g = insert_surrogate(unroll_timesteps(snnc.trace(net, torch.zeros(5, 20)), T=6), kind="sigmoid")
    lin2 = getattr(g, "2")
    assert spike_input_hook in lin2._forward_hooks.values()
    x = torch.randn(6, 5, 20) * 2
    out = g(x)
    (out * torch.linspace(-1, 1, 7)).sum().backward()
    net64 = copy.deepcopy(net).double()
    g64 = insert_surrogate(unroll_timesteps(snnc.trace(net64, torch.zeros(5, 20, dtype=torch.float64)), T=6),
                           kind="sigmoid")
    out64 = g64(x.double())
    torch.testing.assert_close(out.double(), out64, rtol=1e-5, atol=1e-6)   # same spikes in between
    (out64 * torch.linspace(-1, 1, 7, dtype=torch.float64)).sum().backward()
    for a, b in zip(g.parameters(), g64.parameters()):
        assert float(b.grad.abs().sum()) > 0
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-6)


class _AtanSpike(torch.autograd.Function):
    """Heaviside forward, atan surrogate (alpha=2) backward, as a plain-torch user writes it."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return (z >= 0).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad / (1 + (torch.pi * z) ** 2)


def test_open_neuromorphic_task_gradients_equal_a_plain_torch_loop():
    """The ON benchmark task (Linear + LIF over T, ``output.sum().backward()``), small: snnc's
    graph (one Linear over T*B rows, fused scan, broadcast dL/dS) vs a plain loop under autograd."""
    T, B, n = 60, 4, 48
    torch.manual_seed(0)
    proto, x = nn.Linear(n, n), torch.randn(T, B, n) * 2
    g = insert_surrogate(unroll_timesteps(snnc.trace(nn.Sequential(proto, LIF(tau=2.0)), torch.zeros(B, n)), T=T),
                         kind="atan").train()
    out = g(x)
    out.sum().backward()
    ref_lin = nn.Linear(n, n).double()
    ref_lin.load_state_dict(proto.state_dict())
    y, v, spikes = ref_lin(x.double()), torch.zeros(B, n, dtype=torch.float64), []
    for t in range(T):
        v = 0.5 * v + y[t]
        s = _AtanSpike.apply(v - 1.0)
        v = v - s                      # reset by subtraction, differentiated as written
        spikes.append(s)
    ref = torch.stack(spikes)
    ref.sum().backward()
    assert 0.05 < float(out.detach().mean()) < 0.95 and (out.double() != ref).float().mean() < 1e-3
    lin = next(m for m in g.modules() if isinstance(m, nn.Linear))
    torch.testing.assert_close(lin.weight.grad.double(), ref_lin.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lin.bias.grad.double(), ref_lin.bias.grad, rtol=1e-4, atol=1e-4)
    assert float(ref_lin.weight.grad.abs().max()) > 1.0


def test_spikingjelly_tutorial_csnn_gradients_equal_spikingjelly_own_backward():
    """spikingjelly's conv_fashion_mnist CSNN (IFNode, ATan, hard reset), traced by snnc with the
    atan surrogate: the weight gradients equal spikingjelly's own backward."""
    pytest.importorskip("spikingjelly")
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).parent))
    from peer_models import CASES
    from spikingjelly.activation_based import functional
    c = CASES["sj_tutorial_csnn"]
    model, x = c.build(), c.inputs() * 2
    g = insert_surrogate(snnc.trace(model, x), kind="atan")   # eval: BN on running stats, as the model
    functional.reset_net(model)
    ref = model(x)
    ref.square().sum().backward()
    out = g(x)
    out.square().sum().backward()
    assert torch.equal(out, ref) and float(ref.detach().sum()) > 0
    theirs = [p.grad for p in model.parameters() if p.dim() > 1]   # conv and linear weights, in order
    ours = [p.grad for p in g.parameters() if p.dim() > 1]
    assert [t.shape for t in theirs] == [o.shape for o in ours] and len(ours) == 4
    for a, b in zip(ours, theirs):
        assert float(b.abs().sum()) > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _Residual(nn.Module):
    """The conv's output feeds the neuron and, later, an add: it must not be overwritten."""

    def __init__(self):
        super().__init__()
        self.conv1, self.lif1 = nn.Conv2d(2, 4, 3, padding=1), LIF(tau=2.0)
        self.conv2, self.lif2 = nn.Conv2d(4, 4, 3, padding=1), LIF(tau=2.0)

    def forward(self, x):
        y = self.conv1(x)
        s = self.lif1(y)
        return self.lif2(self.conv2(s)) + y


def test_input_current_is_overwritten_only_where_nothing_else_reads_it():
    from snnc.ops.spike_store import _single_use_producers
    torch.manual_seed(0)
    g = insert_surrogate(unroll_timesteps(snnc.trace(_Residual(), torch.zeros(3, 2, 6, 6)), T=4), kind="atan")
    def donors(gm):
        return sorted(n for n, m in gm.named_modules() if m in _single_use_producers(gm))
    assert donors(g) == ["lif2"] and donors(_conv_net()) == ["1", "3"]
    x = torch.rand(4, 3, 2, 6, 6) * 3
    with torch.no_grad():
        ref = g(x)                  # no autograd: plain scan, nothing overwritten
    out = g(x)
    assert torch.equal(out, ref) and 0 < float(ref.detach().abs().mean())
    out.sum().backward()
    with _no_hooks(g):             # the same graph without the graph hooks: same gradients
        g2 = [p.grad.clone() for p in g.parameters()]
        g.zero_grad(set_to_none=True)
        g(x).sum().backward()
        assert all(torch.equal(a, p.grad) for a, p in zip(g2, g.parameters()))


class _no_hooks:
    def __init__(self, g):
        self.g = g

    def __enter__(self):
        self.saved = dict(self.g._forward_pre_hooks), dict(self.g._forward_hooks)
        self.g._forward_pre_hooks.clear()
        self.g._forward_hooks.clear()

    def __exit__(self, *exc):
        self.g._forward_pre_hooks.update(self.saved[0])
        self.g._forward_hooks.update(self.saved[1])


def test_spike_input_conv_backward_with_stride_groups_dilation_and_same_padding(monkeypatch):
    from snnc.ops import spike_layers
    monkeypatch.setattr(spike_layers, "CHUNK_BYTES", 4096)
    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), LIF(tau=2.0),
                        nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=2), LIF(tau=2.0),
                        nn.Conv2d(8, 4, 3, padding="same"), LIF(tau=2.0))
    with torch.no_grad():
        for m in net[2::2]:
            m.weight.mul_(3.0)
    g = insert_surrogate(unroll_timesteps(snnc.trace(net, torch.zeros(3, 2, 9, 9)), T=4), kind="triangle")
    x = torch.rand(4, 3, 2, 9, 9) * 3
    out = g(x)
    (out * torch.rand(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    ours = [p.grad.clone() for p in g.parameters()]
    g.zero_grad(set_to_none=True)
    with _no_hooks(g):
        for m in g.modules():
            m._forward_hooks.clear() if isinstance(m, nn.Conv2d) else None
        out2 = g(x)
        (out2 * torch.rand(out.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert torch.equal(out, out2) and all(float(p.abs().sum()) > 0 for p in ours)
    for a, p in zip(ours, g.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-6)


def test_retrain_saved_state_float16_trains_and_bad_values_are_named():
    from snnc.errors import SnncError
    g = _conv_net()
    torch.manual_seed(0)
    xs, ys = torch.rand(24, 2, 6, 6) * 3, torch.randint(0, 5, (24,))
    batches = [(xs[i:i + 8], ys[i:i + 8]) for i in range(0, 24, 8)]
    with pytest.raises(SnncError, match=r"retrain: saved_state='bf16'; expected one of \('float32', 'float16', 'recompute', 'auto'\)"):
        snnc.retrain(g, batches, saved_state="bf16", progress=False)
    hist = snnc.retrain(g, batches, epochs=3, lr=1e-2, saved_state="float16", progress=False)
    assert len(hist) == 3 and hist[-1]["loss"] < hist[0]["loss"]
