"""Two-state and recurrent peer neurons as IR neurons with fused TVM scans.

snntorch ``Synaptic`` and norse ``LIFCell`` / ``LIFBoxCell`` / ``LICell`` become ``snn.current_lif`` /
``snn.current_li`` (one record per semantics, the peer's discretisation a parameter), and lower on
tvm:llvm as one multi-state TIR scan over T; snntorch ``RLeaky`` / ``RSynaptic`` and NIR recurrent
edges (``snn.feedback``) as one recurrent TIR scan whose body does the matrix-vector product. Each
is compared with the peer's own run: spikes and states bit for bit (the recurrent product sums in
another order than BLAS: spikes equal, states within float rounding)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import snnc
from snnc.errors import InputError
from snnc.ops import LIF, CurrentLI, CurrentLIF, Feedback

pytest.importorskip("tvm")
T_STEPS = 12


def _snntorch_run(model, x):
    from snntorch import utils
    utils.reset(model)
    for layer in model:   # utils.reset leaves the recurrent neurons' previous spikes
        if hasattr(layer, "spk"):
            layer.spk = torch.zeros_like(layer.spk)
    with torch.no_grad():
        outs = [model(xt) for xt in x]
    if isinstance(outs[0], tuple):
        return tuple(torch.stack([o[k] for o in outs]) for k in range(len(outs[0])))
    return torch.stack(outs)


def _scaled(model, w=1.0, b=0.3):
    torch.manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.normal_(0.0, w)
                if m.bias is not None:
                    m.bias.fill_(b)
    return model.eval()


def _relax_text(g):
    from snnc.targets.tvm_lower import to_relax
    return to_relax(g).script()


def _all_targets(g, x):
    outs = {"torch": snnc.compile(g, "torch")(x), "onnx": snnc.compile(g, "onnx")(x)}
    for mode in ("hybrid", "relax"):
        c = snnc.compile(g, "tvm:llvm", mode=mode)
        assert c.meta["compiled_mode"] == mode
        outs[f"tvm:llvm {mode}"] = c(x)
    return outs


@pytest.mark.parametrize("reset", ["subtract", "zero", "none"])
def test_snntorch_synaptic_is_current_lif_and_one_fused_scan(reset):
    snn = pytest.importorskip("snntorch")
    m = _scaled(nn.Sequential(nn.Linear(12, 16), snn.Synaptic(alpha=0.9, beta=0.8, init_hidden=True, reset_mechanism=reset),
                              nn.Linear(16, 5), snn.Synaptic(alpha=0.6, beta=0.7, threshold=0.8, init_hidden=True,
                                                             reset_mechanism=reset)))
    x = torch.rand(T_STEPS, 4, 12)
    ref = _snntorch_run(m, x)
    assert 0 < float(ref.mean()) < 1
    g = snnc.passes.unroll_timesteps(snnc.trace(m, x[0]), T=T_STEPS)
    resets = {"subtract": "subtract_after_leak", "zero": "zero_after_leak", "none": "none"}
    assert f"= snn.current_lif(%1) {{alpha=0.9, beta=0.8, v_th=1, reset={resets[reset]}, compare=>}}" \
        in snnc.dump(g).replace("0.800000011920929", "0.8").replace("0.8999999761581421", "0.9")
    text = _relax_text(g)
    assert text.count("def snn_current_lif_scan") == 2 and "_fn(" not in text   # fused, not exported
    for target, out in _all_targets(g, x).items():
        assert torch.equal(out, ref), target


def test_snntorch_synaptic_reporting_its_state_matches_bit_for_bit():
    snn = pytest.importorskip("snntorch")
    m = _scaled(nn.Sequential(nn.Linear(12, 10), snn.Synaptic(alpha=0.9, beta=0.85, init_hidden=True, output=True)),
                b=0.25)
    # weights, bias and inputs on a dyadic grid: the Linear is exact in any summation order (onnxruntime's
    # GEMM accumulates in its own order on AVX-512 hosts, 1 ulp off torch's), so the states below
    # compare the neuron's arithmetic bit for bit, not two GEMM kernels
    with torch.no_grad():
        m[0].weight.copy_((m[0].weight * 8).round() / 8)
    x = (torch.rand(T_STEPS, 3, 12) * 4).round() / 4
    ref = _snntorch_run(m, x)   # (spk, syn, mem)
    assert 0 < ref[0].mean() < 1                          # it fires, not always
    g = snnc.passes.unroll_timesteps(snnc.trace(m, x[0]), T=T_STEPS)
    for target in ("torch", "onnx", "tvm:llvm"):
        out = snnc.compile(g, target)(x)
        assert len(out) == 3 and torch.equal(out[0], ref[0]), target
        if target == "tvm:llvm":   # the exported forward: TVM's fused elementwise code rounds its own way
            for a, b in zip(out[1:], ref[1:]):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
        else:
            assert all(torch.equal(a, b) for a, b in zip(out[1:], ref[1:])), target


def _norse_run(model, x):
    state, outs = None, []
    with torch.no_grad():
        for xt in x:
            o, state = model(xt, state)
            outs.append(o)
    return torch.stack(outs)


def test_norse_cells_are_current_neurons_in_euler_form_and_fused():
    norse = pytest.importorskip("norse.torch")
    p = norse.LIFParameters(tau_syn_inv=torch.as_tensor(150.0), tau_mem_inv=torch.as_tensor(90.0),
                            v_leak=torch.as_tensor(0.05), v_th=torch.as_tensor(0.4))
    m = _scaled(norse.SequentialState(nn.Linear(8, 12), norse.LIFCell(p), nn.Linear(12, 10), norse.LIFBoxCell(),
                                      nn.Linear(10, 3), norse.LICell()), w=2.0, b=1.0)
    x = torch.rand(30, 2, 8)
    ref = _norse_run(m, x)
    g = snnc.passes.unroll_timesteps(snnc.trace(m, x[0]), T=30)
    text = snnc.dump(g)
    assert "snn.current_lif" in text and "form=euler" in text and "current=false" in text and "snn.current_li" in text
    relax = _relax_text(g)
    assert "def snn_current_li_scan" in relax and "_fn(" not in relax
    # both hidden layers fire (the readout sees spikes)
    layers = list(m.children())
    for k in (2, 4):
        assert 0 < float(_norse_run(norse.SequentialState(*layers[:k]), x).mean()) < 1
    for target, out in _all_targets(g, x).items():
        # the readout's voltages: the unrolled Linear multiplies [T*N, F] at once, rounding as BLAS
        # picks for that size; each cell alone below is bit for bit
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5, msg=target)


@pytest.mark.parametrize("cell", ["LIFCell", "LIFBoxCell", "LICell"])
def test_each_norse_cell_alone_is_bit_for_bit_in_every_target(cell):
    norse = pytest.importorskip("norse.torch")
    m = norse.SequentialState(getattr(norse, cell)())
    x = torch.rand(40, 3, 7) * 6
    ref = _norse_run(m, x)
    assert 0 < float(ref.abs().mean()) and (cell == "LICell" or float(ref.mean()) < 1)
    g = snnc.passes.unroll_timesteps(snnc.trace(m, x[0]), T=40)
    for target, out in _all_targets(g, x).items():
        if cell == "LICell" and target == "tvm:llvm relax":
            # voltages out of the TIR scan: LLVM may contract a * b + c into one FMA (one rounding
            # fewer); spikes are compared exactly, voltages to float rounding
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
        else:
            assert torch.equal(out, ref), target


@pytest.mark.parametrize("kind", ["rleaky", "rsynaptic"])
def test_snntorch_recurrent_neurons_run_as_one_recurrent_scan(kind):
    snn = pytest.importorskip("snntorch")
    cls = snn.RLeaky if kind == "rleaky" else snn.RSynaptic
    kw = {} if kind == "rleaky" else {"alpha": 0.8}
    m = _scaled(nn.Sequential(
        nn.Linear(12, 20), cls(beta=0.9, linear_features=20, init_hidden=True, **kw),
        nn.Linear(20, 6), cls(beta=0.8, all_to_all=False, V=torch.linspace(-0.5, 0.5, 6), init_hidden=True,
                              reset_mechanism="zero", **kw)), w=0.6)
    x = torch.rand(T_STEPS, 5, 12)
    ref = _snntorch_run(m, x)
    assert 0 < float(ref.mean()) < 1
    g = snnc.passes.unroll_timesteps(snnc.trace(m, x[0]), T=T_STEPS)
    text = _relax_text(g)
    assert text.count(f"def snn_{'rlif' if kind == 'rleaky' else 'rsynaptic'}_scan") == 2 and "_fn(" not in text
    for target, out in _all_targets(g, x).items():
        assert torch.equal(out, ref), target
    lib = snnc.compile(g, "tvm:llvm", mode="relax", batch="any")   # the exported library: any batch
    x7 = torch.rand(T_STEPS, 7, 12)
    assert torch.equal(lib(x7), _snntorch_run(m, x7))


def test_snntorch_conv_recurrence_is_refused_by_name():
    snn = pytest.importorskip("snntorch")
    from snnc.errors import UnsupportedOp
    with pytest.raises(UnsupportedOp, match="module '1' .*RLeaky\\): a convolutional recurrence"):
        snnc.trace(nn.Sequential(nn.Conv2d(1, 2, 3), snn.RLeaky(beta=0.9, conv2d_channels=2, kernel_size=3,
                                                                 init_hidden=True)), torch.zeros(1, 1, 6, 6))


@pytest.mark.parametrize("neuron", [LIF(tau=2.0, reset="zero"), CurrentLIF(alpha=0.5, beta=0.8),
                                    CurrentLI(alpha=0.3, beta=0.9)], ids=["lif", "current_lif", "current_li"])
def test_nir_feedback_runs_as_one_recurrent_scan(neuron):
    m = _scaled(nn.Sequential(nn.Linear(6, 8), Feedback(neuron, nn.Linear(8, 8))), w=0.5, b=0.6)
    g = snnc.trace(m, torch.zeros(1, 6))
    x = torch.rand(T_STEPS, 3, 6)
    ref = snnc.run(g, x, T=T_STEPS)
    u = snnc.passes.unroll_timesteps(g, T=T_STEPS)
    assert "def snn_feedback_scan" in _relax_text(u)
    for mode in ("hybrid", "relax"):
        out = snnc.compile(u, "tvm:llvm", mode=mode)(x)
        if isinstance(neuron, CurrentLI):   # a voltage fed back: the product's sum order shows
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(out, ref), mode


def test_tensor_parameters_fall_back_to_the_exported_forward():
    snn = pytest.importorskip("snntorch")
    m = _scaled(nn.Sequential(nn.Linear(12, 10), snn.Synaptic(alpha=torch.linspace(0.5, 0.9, 10), beta=0.8,
                                                              init_hidden=True)))
    x = torch.rand(T_STEPS, 2, 12)
    g = snnc.passes.unroll_timesteps(snnc.trace(m, x[0]), T=T_STEPS)
    c = snnc.compile(g, "tvm:llvm")
    assert c.meta["compiled_mode"] == "relax"
    assert torch.equal(c(x), _snntorch_run(m, x))


def test_run_refuses_an_ambiguous_leading_size_one_input_naming_both_shapes():
    g = snnc.trace(nn.Sequential(nn.Linear(5, 4), LIF(tau=2.0)), torch.zeros(1, 1, 5))   # NIR-style [1, F]
    x = torch.rand(6, 1, 5) * 2
    with pytest.raises(InputError, match=r"input 0 of shape \[6, 1, 5\] \(the graph takes one step of shape "
                                         r"\[1, 1, 5\]\) with T=6 is ambiguous.*sequence=False.*\[6, 1, 1, 5\]"):
        snnc.run(g, x, T=6)
    seq = snnc.run(g, x.unsqueeze(1), T=6)
    assert seq.shape == (6, 1, 1, 4)
    const = snnc.run(g, x, T=6, sequence=False)
    assert const.shape == (6, 6, 1, 4)
    assert torch.equal(const[:, 2], snnc.run(g, x[2:3], T=6)[:, 0])   # batch row 2 fed at every step
    with pytest.raises(InputError, match=r"sequence=True needs \[T, N, \.\.\.\] with 4 dims"):
        snnc.run(g, x, T=6, sequence=True)
    assert torch.equal(snnc.run(g, x.unsqueeze(1), T=6, sequence=True), seq)


def test_peer_two_state_neurons_go_to_nir_and_back_exactly(tmp_path):
    """norse's Euler form and snntorch's deferred reset are not NIR's equations: ``to_nir`` writes
    CubaLIF / CubaLI with the nearest NIR fields and the exact op in the metadata, which
    ``from_nir`` restores (same spikes and voltages as the peer)."""
    norse = pytest.importorskip("norse.torch")
    snn = pytest.importorskip("snntorch")
    import nir
    for m, run in ((_scaled(norse.SequentialState(nn.Linear(6, 9), norse.LIFCell(), nn.Linear(9, 4), norse.LICell()),
                            w=2.0, b=1.0), _norse_run),
                   (_scaled(nn.Sequential(nn.Linear(6, 9), snn.Synaptic(alpha=0.8, beta=0.9, init_hidden=True))),
                    _snntorch_run)):
        x = torch.rand(20, 2, 6)
        g = snnc.trace(m, x[0])
        with pytest.warns(UserWarning) if isinstance(m, nn.Sequential) and not isinstance(m, norse.SequentialState) \
                else _no_warning():
            graph = snnc.to_nir(g, dt=1e-3, path=tmp_path / "g.nir", overwrite=True)
        kinds = sorted(type(n).__name__ for n in graph.nodes.values())
        assert "CubaLIF" in kinds
        back = snnc.from_nir(nir.read(tmp_path / "g.nir"), dt=1e-3)
        assert torch.equal(snnc.run(back, x, T=20), snnc.run(g, x, T=20))
        assert torch.equal(snnc.run(g, x, T=20), run(m, x))


class _no_warning:
    def __enter__(self):
        import warnings
        self._w = warnings.catch_warnings()
        self._w.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        self._w.__exit__(*exc)
        return False
