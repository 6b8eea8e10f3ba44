"""Target onnx: outputs equal the reference interpreter, dynamic batch, export/load round trip,
clear errors for ops it cannot lower."""
import onnx
import pytest
import torch
from torch import nn

import snnc
from snnc.errors import SnncError, UnsupportedOp
from snnc.differential import differential
from snnc.ops import IF, LIF, DirectEncoder, ParametricLIF, PoissonEncoder, Readout
from snnc.passes import unroll_timesteps
from snnc.zoo import bench_net, digits_snn


@pytest.fixture(scope="module")
def digits_graph():
    torch.manual_seed(1)
    return unroll_timesteps(snnc.trace(digits_snn(4).eval(), torch.zeros(2, 1, 8, 8)), T=4)


@pytest.fixture(scope="module")
def digits_onnx(digits_graph):
    return snnc.compile(digits_graph, target="onnx")


def test_digits_snn_matches_reference_at_other_batch_sizes(digits_graph, digits_onnx):
    for batch in (1, 2, 7):  # traced with batch 2: the ONNX batch dimension is symbolic
        x = torch.rand(batch, 1, 8, 8) * 3
        ref = snnc.run(digits_graph, x)
        out = digits_onnx(x)
        assert out.shape == ref.shape == (batch, 10)
        assert (out - ref).abs().max() < 1e-5


def test_model_is_standard_onnx_at_documented_opset(digits_onnx):
    proto = onnx.load_from_string(digits_onnx.model_bytes)
    onnx.checker.check_model(proto)
    assert {(o.domain, o.version) for o in proto.opset_import} == {("", 18)}
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "GreaterOrEqual"} <= ops  # neurons lowered to standard elementwise ops
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].dim_value  # symbolic batch


def test_sequence_input_net_spikes_equal_reference():
    net = bench_net((3, 6, 6))
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(4)  # default init is too weak to make the second layer fire
    g = unroll_timesteps(snnc.trace(net, torch.zeros(2, 3, 8, 8)), T=3)
    m = snnc.compile(g, target="onnx")
    x = torch.rand(3, 5, 3, 8, 8) * 2
    ref = snnc.run(g, x)
    assert ref.mean() > 0.01  # the net spikes, so the comparison means something
    assert torch.equal(m(x), ref)


def test_export_load_round_trip(digits_graph, digits_onnx, tmp_path):
    path = digits_onnx.export(tmp_path / "net.onnx")
    loaded = snnc.load(path)
    assert loaded.target == "onnx" and loaded.meta["opset"] == 18
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(loaded(x), digits_onnx(x))


def test_per_step_graph_needs_T_or_unrolls_itself():
    g = snnc.trace(nn.Sequential(DirectEncoder(), nn.Linear(4, 3), IF(), Readout()), torch.zeros(2, 4))
    with pytest.raises(SnncError, match="per-step.*unroll_timesteps"):
        snnc.compile(g, target="onnx")
    m = snnc.compile(g, target="onnx", T=3)
    x = torch.rand(2, 4) * 2
    assert torch.allclose(m(x), snnc.run(g, x, T=3), atol=1e-6)


def test_surrogate_is_dropped_forward_unchanged():
    class Rect(torch.autograd.Function):
        @staticmethod
        def forward(ctx, z):
            return (z >= 0).float()

        @staticmethod
        def backward(ctx, g):
            return g

    def rect(z, neuron):
        return Rect.apply(z)

    net = nn.Sequential(nn.Linear(4, 5), LIF(decay=0.5, surrogate=rect, reset="zero"), nn.Linear(5, 2))
    g = unroll_timesteps(snnc.trace(net, torch.zeros(2, 4)), T=4)
    x = torch.rand(4, 3, 4) * 3
    assert torch.allclose(snnc.compile(g, target="onnx")(x), snnc.run(g, x), atol=1e-6)


def test_poisson_encoder_is_refused_with_reason():
    g = unroll_timesteps(snnc.trace(nn.Sequential(PoissonEncoder(), nn.Linear(4, 2), IF()), torch.zeros(2, 4)), T=2)
    with pytest.raises(UnsupportedOp, match=r"node %.* op snn.poisson_encoder has no onnx lowering "
                                            r"\(torch's random stream.*supported: .*snn.lif"):
        snnc.compile(g, target="onnx")


@pytest.mark.parametrize("loop", ["unroll", "scan"])
def test_every_neuron_variant_bit_exact_in_both_loop_forms(loop):
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), IF(v_th=torch.tensor([0.5, 1.0, 1.5]).view(3, 1, 1), compare=">"),
        nn.Conv2d(3, 3, 1), LIF(tau=2.0, decay_input=True, v_leak=0.1, reset="zero", v_reset=-0.2, v_init=0.3),
        nn.Conv2d(3, 3, 1), ParametricLIF(init_tau=3.0), nn.Flatten(), nn.Linear(48, 4), Readout())
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3)
    g = unroll_timesteps(snnc.trace(net, torch.zeros(2, 2, 4, 4)), T=5)
    m = snnc.compile(g, target="onnx", loop=loop)
    ops = {n.op_type for n in onnx.load_from_string(m.model_bytes).graph.node}
    assert ("Scan" in ops) == (loop == "scan")
    x = torch.rand(5, 3, 2, 4, 4) * 2
    assert torch.allclose(m(x), snnc.run(g, x), atol=1e-5)
    res = differential(g, x, targets=["onnx"], options={"onnx": {"loop": loop}}).targets["onnx"]
    spikes = [r for r in res.layers if r.spiking]
    assert len(spikes) == 3 and all(r.agreement == 1.0 for r in spikes), str(res)


def test_other_snnc_ops_export_from_their_reference_forward():
    """tdBN, NeuNorm, DSR neurons and QCFS need no ONNX code of their own: their forward is traced."""
    from snnc.ops.dsr import DSRIF, DSRLIF
    from snnc.ops.norm import NeuNorm, TDBatchNorm
    from snnc.ops.qcfs import QCFS
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), TDBatchNorm(4), DSRIF(v_th=0.5), nn.Conv2d(4, 4, 3, padding=1),
                        NeuNorm(4, 4, 4), DSRLIF(tau=2.0, v_th=0.5, alpha=0.5), nn.Conv2d(4, 4, 1), QCFS(), IF(),
                        nn.Flatten(), nn.Linear(64, 3), Readout()).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1:
                p.mul_(3)
    g = unroll_timesteps(snnc.trace(net, torch.zeros(2, 2, 4, 4)), T=4)
    res = differential(g, torch.rand(4, 3, 2, 4, 4) * 2, targets=["onnx"]).targets["onnx"]
    assert res.status == "ok" and len([r for r in res.layers if r.spiking]) == 3, str(res)


def test_integer_ir_is_refused_with_reason():
    from snnc.passes import quantize_integer
    q = quantize_integer(unroll_timesteps(snnc.trace(bench_net((2, 3)), torch.zeros(1, 2, 4, 4)), T=2))
    with pytest.raises(UnsupportedOp, match=r"op int.conv2d has no onnx lowering \(the integer IR runs on tvm:int"):
        snnc.compile(q, target="onnx")


def test_hard_coded_batch_exports_fixed_batch_and_says_so():
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x.view(2, 4))  # the batch is baked into the graph

    g = snnc.trace(Fixed(), torch.zeros(2, 1, 4))
    m = snnc.compile(g, target="onnx")
    assert m.meta["dynamic_batch"] is False
    x = torch.rand(2, 1, 4)
    assert torch.allclose(m(x), snnc.run(g, x), atol=1e-6)
    with pytest.raises(SnncError, match=r"expected shape \[2, 1, 4\], got \[3, 1, 4\]"):
        m(torch.rand(3, 1, 4))
