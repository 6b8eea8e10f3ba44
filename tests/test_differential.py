"""The differential harness: every available target against the reference, layer by layer, on the
zoo models; and the harness itself names the first diverging layer of a faulty target."""
import sys
import types

import pytest
import torch
from torch import nn

import snnc
from snnc.compiled import TARGETS
from snnc.differential import FLOAT_AGREEMENT, INTEGER_ONLY_TARGETS, differential, unavailable_reason
from snnc.errors import SnncError
from snnc.ops import LIF, Neuron
from snnc.passes import unroll_timesteps
from snnc.zoo import bench_net, digits_snn
from snnc.targets.eager import TorchModule


def _strong(model, gain):
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(gain)
    return model.eval()


ZOO = {
    "digits_snn": lambda: (snnc.trace(_strong(digits_snn(4), 2.0), torch.zeros(2, 1, 8, 8)), 4, torch.rand(3, 1, 8, 8) * 3),
    "bench_net": lambda: (snnc.trace(_strong(bench_net((3, 8, 8, 8)), 3.0), torch.zeros(2, 3, 8, 8)), 3,
                          torch.rand(3, 4, 3, 8, 8) * 2),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_agrees_on_every_available_target(name):
    g, T, x = ZOO[name]()
    report = differential(g, x, T=T)
    assert report.ok, "\n" + report.failures()
    float_targets = {t for t in TARGETS if unavailable_reason(t) is None} - set(INTEGER_ONLY_TARGETS)
    assert set(report.ran()) == float_targets >= {"torch", "onnx"}, str(report)  # none skipped as unsupported
    for t in report.ran():
        res = report.targets[t]
        spikes = [r for r in res.layers if r.spiking]
        assert len(spikes) == sum(isinstance(m, Neuron) for m in g.modules())
        assert all(r.agreement >= FLOAT_AGREEMENT for r in res.layers)
    assert "integer-only" in report.targets["tvm:int"].reason


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_integer_ir_is_bit_exact_on_integer_targets(name):
    from snnc.passes import fold_bn, quantize_integer
    from snnc.passes.quantize_integer import quantize_input
    g, T, x = ZOO[name]()
    q = quantize_integer(unroll_timesteps(fold_bn(g), T=T))
    report = differential(q, quantize_input(q, x))
    assert report.integer and report.ok, "\n" + report.failures()
    assert all(t.required == 1.0 for t in report.targets.values())
    want = {"torch"} | {t for t in INTEGER_ONLY_TARGETS if unavailable_reason(t) is None}
    assert want <= set(report.ran()), str(report)
    assert "int.conv2d has no onnx lowering" in report.targets["onnx"].reason


# -- the harness itself, on fake targets registered for the test ----------------------------------

def _fake_target(monkeypatch, name, corrupt, single_output_only=False):
    """Register target ``name`` that runs the graph in torch after ``corrupt(gm)``."""
    mod = types.ModuleType(f"fake_target_{name}")

    def compile(gm, target):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        if single_output_only and not isinstance(out.args[0], torch.fx.Node):
            raise RuntimeError("this backend builds single-output graphs only")
        from snnc.differential import _copy_graph
        g = _copy_graph(gm)
        corrupt(g)
        return TorchModule(g)

    mod.compile = compile
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setitem(TARGETS, name, mod.__name__)


def _two_layer():
    net = nn.Sequential(nn.Linear(6, 8), LIF(decay=0.5), nn.Linear(8, 8), LIF(decay=0.5), nn.Linear(8, 3))
    return unroll_timesteps(snnc.trace(_strong(net, 3.0), torch.zeros(2, 6)), T=4)


def test_faulty_target_is_named_at_first_diverging_layer(monkeypatch):
    g = _two_layer()
    second = [n for n in g.graph.nodes if n.op == "call_module" and isinstance(g.get_submodule(n.target), LIF)][1]

    def lower_threshold(gm):
        gm.get_submodule(second.target).v_th = 0.5
    _fake_target(monkeypatch, "wrong_vth", lower_threshold)
    x = torch.rand(4, 5, 6) * 2
    report = differential(g, x, targets=["torch", "wrong_vth"])
    res = report.targets["wrong_vth"]
    assert not report.ok and res.status == "diverged"
    assert res.first_divergence.layer == f"%{second.name}" and res.first_divergence.op == "snn.lif"
    assert all(r.ok for r in res.layers[:res.layers.index(res.first_divergence)])  # currents into it agree
    assert f"first divergence at %{second.name} snn.lif" in str(res) and "<-- diverges" in str(res)
    assert report.targets["torch"].status == "ok"


def test_single_output_backend_gets_prefix_graphs(monkeypatch):
    _fake_target(monkeypatch, "single", lambda gm: None, single_output_only=True)
    report = differential(_two_layer(), torch.rand(4, 5, 6) * 2, targets=["single"])
    res = report.targets["single"]
    assert res.status == "ok" and len(res.layers) == 5  # 2 x (current, spikes) + output


def test_integer_graph_needs_bit_exact_targets(monkeypatch):
    def float_noise(gm):
        last = [n for n in gm.graph.nodes if n.op == "call_module"][-1]
        gm.get_submodule(last.target).bias.data += 1e-6
    _fake_target(monkeypatch, "noisy", float_noise)
    g = _two_layer()
    x = torch.rand(4, 5, 6) * 2
    assert differential(g, x, targets=["noisy"]).ok  # a 1e-6 drift is fine for a float graph
    g.snnc_integer = {"output_scale": 1.0}  # the mark quantize_integer leaves on the integer IR
    report = differential(g, x, targets=["noisy"])
    assert report.integer and not report.ok
    assert report.targets["noisy"].required == 1.0
    assert report.targets["noisy"].first_divergence.layer.endswith("(output)")


def test_unknown_target_and_per_step_graph_without_T():
    g = _two_layer()
    with pytest.raises(SnncError, match="unknown target 'nope'"):
        differential(g, torch.rand(4, 2, 6), targets=["nope"])
    step = snnc.trace(nn.Sequential(nn.Linear(3, 2), LIF(decay=0.5)), torch.zeros(2, 3))
    with pytest.raises(SnncError, match="per-step; pass T="):
        differential(step, torch.rand(2, 3))
