"""The op registry: one record per IR op; stages ask it which ops they lower, and their errors
name the node, the op, what the stage supports and where the op does run."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import snnc
from snnc.errors import UnsupportedOp, VerifyError
from snnc.ops import LIF, PoissonEncoder, registry
from snnc.ops.registry import FORWARD, OpRecord
from snnc.passes import unroll_timesteps


def _graph():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), LIF(), nn.Flatten(), nn.Linear(32, 3))
    return snnc.trace(net.eval(), torch.zeros(2, 1, 4, 4))


def test_every_node_of_a_traced_graph_has_a_record():
    g = _graph()
    names = [registry.lookup(g, n).name for n in g.graph.nodes]
    assert names == ["placeholder", "nn.conv2d", "nn.batch_norm", "snn.lif", "nn.flatten", "nn.linear", "output"]
    lif = registry.record("snn.lif")
    assert lif.spiking == "yes" and lif.state == ("v",) and lif.over_time == "loop"
    assert registry.record("nn.conv2d").time_agnostic is False


def test_missing_hook_names_node_op_supporting_stages_and_the_stage_list():
    g = unroll_timesteps(snnc.trace(nn.Sequential(PoissonEncoder(), nn.Linear(4, 3), LIF()), torch.zeros(2, 4)), T=3)
    enc = next(n for n in g.graph.nodes if n.op == "call_module" and isinstance(g.get_submodule(n.target), PoissonEncoder))
    with pytest.raises(UnsupportedOp, match=rf"node %{enc.name} \(call_module '{enc.target}'\): op snn.poisson_encoder "
                                            r"has no tvm lowering; supported: .*nn.conv2d.*snn.alif.*snn.lif.*; "
                                            r"snn.poisson_encoder runs on: torch$"):
        registry.hook(g, enc, "tvm")
    conv = _graph()
    node = next(n for n in conv.graph.nodes if n.name == "_0")
    with pytest.raises(UnsupportedOp, match=r"op nn.conv2d has no tvm:int lowering; supported: .*int.add.*"
                                            r"nn.conv2d runs on: torch, nir_out, onnx, tvm$"):
        registry.hook(conv, node, "tvm:int")
    assert registry.hook(conv, node, "onnx") == FORWARD


def test_stage_lists_come_from_the_registry():
    from snnc import nir_export, verifier
    from snnc.targets import onnx
    assert onnx.supported_ops() == registry.supported("onnx")
    assert "snn.poisson_encoder" not in onnx.supported_ops() and "snn.alif" in onnx.supported_ops()
    assert verifier.supported_ops() == registry.supported()
    assert "snn.lif" in nir_export.supported_ops() and "snn.alif" not in nir_export.supported_ops()
    pytest.importorskip("tvm")
    from snnc.targets import tvm_int_lower, tvm_lower
    assert tvm_lower.supported_ops() == registry.supported("tvm")
    assert {"snn.alif", "snn.plif", "nn.batch_norm"} <= set(tvm_lower.supported_ops())
    assert tvm_int_lower.supported_ops() == registry.supported("tvm:int")


class Square(nn.Module):
    """x * x: an op a user adds with one record."""
    op_name = "user.square"

    def forward(self, x):
        return x * x

    def attrs(self):
        return {}


def test_a_new_op_is_one_record():
    g = snnc.trace(nn.Sequential(nn.Linear(4, 3), Square()), torch.zeros(2, 4))
    with pytest.raises(UnsupportedOp, match="op user.square has no onnx lowering"):
        snnc.compile(g, target="onnx")
    registry.register_op(Square, spiking="keep", hooks={"onnx": FORWARD})
    try:
        assert "user.square" in registry.supported("onnx")
        x = torch.rand(5, 4)
        assert torch.allclose(snnc.compile(g, target="onnx")(x), g(x), atol=1e-6)
        assert "= user.square(%1)" in snnc.dump(g)
    finally:
        registry.unregister("user.square")
    assert "user.square" not in registry.supported()


def test_a_subclass_of_a_torch_layer_is_not_that_layer():
    class MyLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * 2
    assert registry.module_record(MyLinear(2, 2)) is None
    assert registry.module_record(nn.Linear(2, 2)).name == "nn.linear"


def test_verifier_does_not_rerun_an_annotated_graph_but_catches_stale_metadata(monkeypatch):
    from snnc import ir
    runs = []
    real = ir._Annotator.run
    monkeypatch.setattr(ir._Annotator, "run", lambda self, *a: runs.append(1) or real(self, *a))
    g = _graph()
    runs.clear()
    out = snnc.PassManager(["fold_bn"]).run(g)
    assert len(runs) == 1                   # the pass annotated its result once; verify reused it
    snnc.verify(out)
    assert len(runs) == 1
    out.get_submodule("4").out_features = 99    # a change behind the metadata's back ...
    out.get_submodule("4").weight.data = torch.zeros(99, 32)
    out.get_submodule("4").bias.data = torch.zeros(99)
    with pytest.raises(VerifyError, match=r"node %_4 .*metadata says torch.float32\[2, 3\] but the graph computes "
                                          r"torch.float32\[2, 99\]"):
        snnc.verify(out)                    # ... is caught from the shapes alone (fake tensors) ...
    assert len(runs) == 1
    out.graph.create_node("call_function", torch.relu, (next(iter(out.graph.nodes)),))   # a node without metadata
    with pytest.raises(VerifyError, match="metadata says"):
        snnc.verify(out)                    # ... or by running the graph when the shapes cannot tell
    assert len(runs) == 2


def test_importing_ops_imports_no_tvm_and_has_no_cycles():
    code = ("import sys, snnc.ops.neuron_scan, snnc.ops.dsr, snnc.ir, snnc.runtime; "
            "assert 'tvm' not in sys.modules, 'tvm imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_static_shapes_equal_what_the_graph_computes():
    from snnc.ir import info
    from snnc.ops import ALIF, NeuNorm, Readout
    from snnc.static_shapes import static_shapes
    graphs = [
        unroll_timesteps(snnc.trace(nn.Sequential(PoissonEncoder(), nn.Linear(4, 3), ALIF(), Readout()),
                                    torch.zeros(2, 4)), T=3),
        unroll_timesteps(snnc.trace(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), NeuNorm(2, 4, 4), LIF(),
                                                  nn.MaxPool2d(2), nn.Flatten()), torch.zeros(2, 1, 4, 4)), T=5),
    ]
    for g in graphs:
        shapes = static_shapes(g)
        assert shapes is not None
        for n in g.graph.nodes:
            if info(n) is not None:
                assert shapes[n] == (info(n).shape, info(n).dtype), n.name
        assert all(getattr(m, "v", None) is None for m in g.modules())   # no fake state left behind
