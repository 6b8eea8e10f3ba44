"""``scan_state("auto" | "recompute")``: the fused scan keeps no membrane for backward where its
input current is a training conv's output; backward recomputes the conv output and ``z``. Checked:
the recomputed conv output and ``z`` are the forward's bits, the gradients are bit-identical to
keeping ``z`` in float32 (native and torch scans, int8 and float32 convs), what each scan node
keeps (counted, not timed), backward twice with ``retain_graph``, and a ``retrain`` run."""
import pytest
import torch
from torch import nn

import snnc
from snnc.ops import LIF, native, train_conv
from snnc.passes import insert_surrogate, unroll_timesteps
from snnc.training import retrain, scan_state, spike_convs

T, N = 3, 2


def _net():
    """conv1 reads 2*3*3 = 18 inputs per output (cheap: "auto" recomputes it), conv2 8*3*3 = 72
    (over ``CHEAP_FAN_IN``: "auto" keeps its scan's z); both layers fire."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), LIF(tau=2.0), nn.Conv2d(8, 16, 3, padding=1),
                        LIF(decay=0.75, reset="zero", compare=">"), nn.Flatten(), nn.Linear(16 * 36, 5))
    with torch.no_grad():
        net[2].weight.mul_(4.0)
    return insert_surrogate(unroll_timesteps(snnc.trace(net, torch.zeros(N, 2, 6, 6)), T=T), kind="atan").train()


def _run(g, x, state, convs, retain=False):
    """Output and parameter gradients of one step; dL/dout is not a constant (a weighted sum)."""
    g.zero_grad(set_to_none=True)
    with scan_state(state), spike_convs(convs):
        out = g(x)
    loss = (out * torch.linspace(-1, 2, out.shape[-1])).sum()
    loss.backward(retain_graph=retain)
    return out.detach(), [p.grad.clone() for p in g.parameters()], loss


def _spy(monkeypatch):
    calls = []
    real = train_conv.recompute

    def counting(tensors, meta):
        calls.append(meta[0])
        return real(tensors, meta)
    monkeypatch.setattr(train_conv, "recompute", counting)
    return calls


@pytest.mark.parametrize("native_scan", (True, False))
@pytest.mark.parametrize("convs", ("int8", "float32"))
@pytest.mark.parametrize("state, recomputed", (("auto", 1), ("recompute", 2)))
def test_gradients_are_bit_identical_to_keeping_z_in_float32(monkeypatch, native_scan, convs, state, recomputed):
    if native_scan and native.load() is None:
        pytest.skip(f"native kernels unavailable: {native._state['error']}")
    if not native_scan:
        monkeypatch.setattr(native, "load", lambda: None)   # the torch scan (and dense dL/dW)
    g, x = _net(), torch.rand(T, N, 2, 6, 6) * 3
    out_ref, grads_ref, _ = _run(g, x, "float32", convs)
    calls = _spy(monkeypatch)
    out, grads, _ = _run(g, x, state, convs)
    assert len(calls) == recomputed                       # conv1 only under "auto", both convs else
    assert torch.equal(out, out_ref)
    assert all(float(gr.abs().sum()) > 0 for gr in grads_ref)   # every layer gets a gradient
    for a, b in zip(grads, grads_ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("convs", ("int8", "float32"))
def test_recomputed_conv_output_and_state_are_the_forwards_bits(convs):
    g, x = _net(), torch.rand(T, N, 2, 6, 6) * 3
    seen = []

    def keep(module, args, out):   # before the scan writes its spikes over the conv output
        seen.append((out.detach().clone(), train_conv.recompute_recipe(out)))
    hooks = [m.register_forward_hook(keep) for m in g.modules() if isinstance(m, nn.Conv2d)]
    with scan_state("recompute"), spike_convs(convs):
        g(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 and all(recipe is not None for _, recipe in seen)
    for out, (tensors, meta) in seen:
        again = train_conv.recompute(tensors, meta)
        assert again.data_ptr() != out.data_ptr() and torch.equal(again, out)
    lib = native.load()
    if lib is not None:   # z recomputed in place over the input current == the forward's z
        from snnc.ops.neuron_scan import _native_plan
        y = seen[1][0].unflatten(0, (T, N))
        neuron = next(m for m in g.modules() if isinstance(m, LIF) and m.reset_mode == "zero")
        p = _native_plan(neuron, y, neuron.surrogate)[1]
        s, s8, z = native.scan_forward(lib, y, p)
        s2, s82, none = native.scan_forward(lib, y, p, keep_state=False)
        assert none is None and torch.equal(s, s2) and torch.equal(s8, s82)
        assert torch.equal(native.scan_state_in_place(lib, y.clone(), p), z)
        gs = torch.randn_like(y)
        gx = native.scan_backward(lib, z, s8, gs, p, "atan", 2.0)
        assert torch.equal(native.scan_backward(lib, z.clone(), s8, gs, p, "atan", 2.0, in_place=True), gx)


def _scan_nodes(out):
    nodes, stack, seen = [], [out.grad_fn], set()
    while stack:
        n = stack.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        if type(n).__name__ == "_NeuronScanBackward":
            nodes.append(n)
        stack.extend(f for f, _ in n.next_functions)
    return nodes


@pytest.mark.parametrize("state, kept", (("float32", 2), ("auto", 1), ("recompute", 0)))
def test_which_scans_keep_a_float32_membrane(state, kept):
    """A scan that recomputes keeps no float32 [T, N, ...] tensor at all: its uint8 spikes and
    the conv's own saved input and weight (no new memory)."""
    g, x = _net(), torch.rand(T, N, 2, 6, 6) * 3
    with scan_state(state), spike_convs("float32"):
        out = g(x)
    nodes = _scan_nodes(out)
    assert len(nodes) == 2
    big = [[t for t in n.saved_tensors if t is not None and t.dtype == torch.float32 and t.shape[:2] == (T, N)]
           for n in nodes]
    assert sum(len(b) for b in big) == kept and all(len(b) <= 1 for b in big)
    for n in nodes:
        assert [t.dtype for t in n.saved_tensors if t is not None and t.dim() == 5] == (
            [torch.float32, torch.uint8] if n.saved_tensors[0] is not None else [torch.uint8])
    out.sum().backward()


@pytest.mark.parametrize("state", ("float32", "recompute"))
def test_backward_twice_with_retain_graph(state):
    """dL/dX is written over z only when the graph is not kept: a second backward reads the same z."""
    g, x = _net(), torch.rand(T, N, 2, 6, 6) * 3
    _, once, _ = _run(g, x, state, "float32")
    _, first, loss = _run(g, x, state, "float32", retain=True)
    loss.backward()
    for a, p in zip(once, g.parameters()):
        assert torch.equal(p.grad, 2 * a)


def test_retrain_default_recomputes_and_learns(monkeypatch):
    g = _net()
    torch.manual_seed(0)
    xs, ys = torch.rand(48, 2, 6, 6) * 3, torch.randint(0, 5, (48,))
    batches = [(xs[i:i + 8], ys[i:i + 8]) for i in range(0, 48, 8)]
    calls = _spy(monkeypatch)
    hist = retrain(g, batches, epochs=4, lr=1e-2, progress=False)   # saved_state="auto", convs="int8"
    assert len(calls) == 4 * len(batches)                 # conv1's output, once per step
    assert hist[-1]["loss"] < 0.8 * hist[0]["loss"] and hist[-1]["train_acc"] > hist[0]["train_acc"]


def test_input_gradient_alone_reads_no_input_values(monkeypatch):
    """``conv_backward`` with dL/dW not wanted passes an expanded placeholder for the input (no
    float32 copy of the spikes): dL/dx is the same bits as with the real float32 input."""
    from snnc.ops import spike_layers
    monkeypatch.setattr(spike_layers, "CHUNK_BYTES", 4 * 8 * 49 * 2)   # two samples per chunk
    cl = torch.channels_last
    s8 = (torch.rand(6, 8, 7, 7) < 0.2).to(torch.uint8).contiguous(memory_format=cl)
    go = torch.randn(6, 16, 4, 4).contiguous(memory_format=cl)
    w = torch.randn(16, 8, 3, 3).contiguous(memory_format=cl)
    geometry = ([2, 2], [1, 1], [1, 1], 1)
    ref = torch.ops.aten.convolution_backward(go, s8.float(), w, None, *geometry[:3], False, [0, 0], 1,
                                              [True, False, False])[0]
    for whole in (0, 1 << 30):   # row chunks, one call
        gi, gw, gb = spike_layers.conv_backward(go, s8, w, geometry, True, False, False, whole)
        assert gw is None and gb is None and torch.equal(gi, ref)
