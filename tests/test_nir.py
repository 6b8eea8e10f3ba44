"""NIR import/export: the NIR paper's graphs (written by norse, sinabs, rockpool), exact round trips,
and clear errors for what snnc cannot represent."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snnc
from snnc.data import nir_paper_dir
from snnc.errors import FileFormatError, SnncError, UnsupportedOp
from snnc.fileio import OverwriteError
from snnc.ops import IF, LIF, DirectEncoder, ParametricLIF, Readout

nir = pytest.importorskip("nir")
PAPER = nir_paper_dir()
needs_paper = pytest.mark.skipif(not PAPER.exists(), reason="NIR paper graphs not present")
PATTERN = "0000001000 0000000000 0010000100 0110010100 1101111111 1111000000 0000000111 1111111110 0000110000 0000000000"


def paper_lif_input():
    """The paper's task-1 input: entry i of the pattern at step 10*i, [T=1000, N=1, 1]."""
    x = torch.zeros(1000, 1, 1)
    for i, c in enumerate(PATTERN.replace(" ", "")):
        x[10 * i, 0, 0] = float(c)
    return x


@needs_paper
def test_norse_lif_graph_reproduces_norse_spikes_and_membrane():
    gm = snnc.from_nir(PAPER / "lif_norse.nir", dt=1e-4)
    assert snnc.dump(gm) == (
        "graph(%0: f32[1,1]) {\n"
        "  %1 : f32[1,1] = nn.linear(%0) {out=1} (weight=f32[1,1], bias=f32[1])  # n0\n"
        "  %2 : spike[1,1] = snn.lif(%1) {decay=0.96, decay_input=true, v_th=0.1, v_reset=0, reset=zero, "
        "compare=>}  # n1\n"
        "  return %2\n}\n")
    x = paper_lif_input()
    csv = np.loadtxt(PAPER / "lif_norse.csv", delimiter=",")
    assert np.array_equal(x[:, 0, 0].numpy(), csv[:, 0])  # the pattern as norse saw it
    spikes = snnc.run(gm, x, T=1000)[:, 0, 0]
    assert torch.nonzero(spikes).flatten().tolist() == [460, 510, 710, 760]
    assert np.nonzero(csv[:, 2])[0].tolist() == [460, 510, 710, 760]
    snnc.reset(gm)
    v = []
    with torch.no_grad():
        for t in range(1000):
            gm(x[t])
            v.append(gm.n1.v.item())
    assert np.abs(np.array(v) - csv[:, 1]).max() < 1e-6  # same forward-Euler membrane, float32 rounding


@needs_paper
def test_lif_needs_dt_and_rockpool_file_imports_despite_its_type_error():
    with pytest.raises(SnncError, match="'1' \\(LIF\\).*pass dt="):
        snnc.from_nir(PAPER / "lif_norse.nir")
    gm = snnc.from_nir(PAPER / "lif_rockpool.nir", dt=1e-4)  # nir.read's type check rejects this file
    assert "mul(%1, 0.96079)" in snnc.dump(gm)  # gain r dt/tau = 24.02 * 0.04 is neither 1 nor dt/tau
    assert snnc.run(gm, paper_lif_input(), T=1000).sum() > 0


def _nir_cnn_reference(g, x_seq):
    """Independent NIR semantics for the sinabs CNN: IF v += I, spike v > v_th, reset to v_reset."""
    n = g.nodes
    t32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))
    conv = lambda k, x: F.conv2d(x, t32(n[k].weight), t32(n[k].bias), stride=tuple(n[k].stride),
                                 padding=tuple(n[k].padding))
    state, out = {}, []

    def fire(k, i):
        v = state.get(k, torch.zeros_like(i)) + i
        s = (v > t32(n[k].v_threshold)).float()
        state[k] = torch.where(s > 0, t32(n[k].v_reset).expand_as(v), v)
        return s

    for x in x_seq:
        h = fire("1", conv("0", x))
        h = F.lp_pool2d(fire("3", conv("2", h)), 1, 2)   # SumPool2d as norse imports it (LPPool, p=1)
        h = F.lp_pool2d(fire("6", conv("5", h)), 1, 2).flatten(1)
        h = fire("10", F.linear(h, t32(n["9"].weight), t32(n["9"].bias)))
        out.append(fire("12", F.linear(h, t32(n["11"].weight), t32(n["11"].bias))))
    return torch.stack(out)


@needs_paper
def test_sinabs_cnn_imports_and_runs_on_event_frames():
    g = nir.read(PAPER / "cnn_sinabs.nir")
    with pytest.warns(UserWarning, match="NIR nodes 1, 3, 6, 10, 12 \\(IF with r=1, v_reset=0, as sinabs writes"):
        gm = snnc.from_nir(g)
    text = snnc.dump(gm)
    assert "graph(%0: f32[1,2,34,34])" in text and "nn.flatten(%10) {start_dim=1}" in text
    assert text.count("snn.if(") == 5 and text.count("= mul(") == 2
    gen = torch.Generator().manual_seed(0)
    frames = torch.poisson(torch.full((12, 4, 2, 34, 34), 0.3), generator=gen)  # event counts per bin
    out = snnc.run(gm, frames, T=12)
    assert out.shape == (12, 4, 10)
    ref = _nir_cnn_reference(g, frames)
    assert ref.sum() > 0 and torch.equal(out, ref)


def _rich_graph():
    """Every exportable op, with spikes flowing: skip add (NIR fan-in), SumPool, Scale, flatten,
    per-channel threshold, LIF by tau and by decay, PLIF, '>' vs '>=', v_init."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = DirectEncoder()
            self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
            self.lif1 = LIF(tau=2.0, v_th=0.3)
            self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
            self.if2 = IF(v_th=torch.tensor([0.2, 0.4, 0.6, 0.8]).view(4, 1, 1), reset="zero", compare=">")
            self.pool = nn.AvgPool2d(2)
            self.fc1 = nn.Linear(4 * 9, 12)
            self.plif = ParametricLIF(init_tau=3.0, v_th=0.4, v_init=0.1)
            self.fc2 = nn.Linear(12, 5, bias=False)
            self.lif2 = LIF(decay=0.8, decay_input=True, v_leak=0.05, v_th=0.2, reset="zero", v_reset=-0.1)
            self.pool_avg = nn.AvgPool2d(3)

        def forward(self, x):
            x = self.enc(x)
            a = self.lif1(self.conv1(x))
            b = self.if2(self.conv2(a) + a)
            s = self.pool(b) * 4.0
            h = self.plif(self.fc1(torch.flatten(s * 0.5, 1)))
            return self.lif2(self.fc2(h)), self.pool_avg(a)
    return snnc.trace(Net(), torch.zeros(1, 2, 6, 6))


def _run_two_outputs(gm, x_seq):
    """Per-step run of a two-output graph (snnc.run stacks single outputs only)."""
    snnc.reset(gm)
    with torch.no_grad():
        steps = [gm(x) for x in x_seq]
    return [torch.stack([s[i] for s in steps]) for i in range(2)]


def test_round_trip_through_a_file_is_exact(tmp_path):
    gm = _rich_graph()
    with pytest.warns(UserWarning, match="lif1, plif"):
        snnc.to_nir(gm, dt=1e-3, path=tmp_path / "net.nir")
    g = nir.read(tmp_path / "net.nir")
    kinds = sorted(type(n).__name__ for n in g.nodes.values())
    assert kinds == ["Affine", "AvgPool2d", "Conv2d", "Conv2d", "Flatten", "IF", "Input", "LIF", "LIF", "LIF",
                     "Linear", "Output", "Output", "Scale", "SumPool2d"]
    assert ("lif1", "if2") in g.edges and ("conv2", "if2") in g.edges  # the add is NIR fan-in
    assert np.allclose(g.nodes["lif1"].tau, 2e-3)  # tau in steps * dt
    back = snnc.from_nir(tmp_path / "net.nir")
    x = torch.rand(10, 3, 2, 6, 6) * 2
    want, got = _run_two_outputs(gm, x), _run_two_outputs(back, x)
    for w, o in zip(want, got):
        assert w.sum() > 0 and torch.equal(w, o)


@needs_paper
def test_nir_to_snnc_to_nir_to_snnc_is_exact_on_the_paper_cnn(tmp_path):
    first = snnc.from_nir(PAPER / "cnn_sinabs.nir", warn=False)
    snnc.to_nir(first, path=tmp_path / "again.nir")
    second = snnc.from_nir(tmp_path / "again.nir")
    assert snnc.dump(second) == snnc.dump(first)
    frames = torch.poisson(torch.full((6, 2, 2, 34, 34), 0.3))
    assert torch.equal(snnc.run(first, frames, T=6), snnc.run(second, frames, T=6))


def test_nir_graph_built_directly_follows_forward_euler():
    tau, r, dt = np.array([0.02, 0.02]), np.array([2.0, 2.0]), 1e-3
    g = nir.NIRGraph(nodes={
        "in": nir.Input(input_type={"input": np.array([3])}),
        "fc": nir.Affine(weight=np.arange(6, dtype=np.float32).reshape(2, 3) / 6, bias=np.zeros(2, np.float32)),
        "sc": nir.Scale(scale=np.array([1.0, 0.5], dtype=np.float32)),
        "lif": nir.LIF(tau=tau, r=r, v_leak=np.full(2, 0.1), v_threshold=np.full(2, 0.3), v_reset=np.zeros(2)),
        "out": nir.Output(output_type={"output": np.array([2])})},
        edges=[("in", "fc"), ("fc", "sc"), ("sc", "lif"), ("lif", "out")])
    gm = snnc.from_nir(g, dt=dt)
    x = torch.rand(40, 2, 3) * 4
    v, want = torch.zeros(2, 2), []
    w = torch.arange(6.0).view(2, 3) / 6
    for t in range(40):  # tau dv/dt = (v_leak - v) + r I, one Euler step; fire v > v_th; reset to 0
        v = v + dt / 0.02 * ((0.1 - v) + 2.0 * (x[t] @ w.T * torch.tensor([1.0, 0.5])))
        s = (v > 0.3).float()
        v = v * (1 - s)
        want.append(s)
    got = snnc.run(gm, x, T=40)
    assert torch.stack(want).sum() > 0 and torch.equal(got, torch.stack(want))


def test_unrepresentable_nodes_are_named():
    one = np.ones(3)
    thr = nir.NIRGraph(nodes={"in": nir.Input(input_type={"input": np.array([3])}),
                              "th": nir.Threshold(threshold=one),
                              "out": nir.Output(output_type={"output": np.array([3])})},
                       edges=[("in", "th"), ("th", "out")])
    with pytest.raises(UnsupportedOp, match="'th' \\(Threshold\\) has no snnc mapping; supported NIR nodes: Input"):
        snnc.from_nir(thr)
    per_neuron_tau = nir.NIRGraph(nodes={
        "in": nir.Input(input_type={"input": np.array([3])}),
        "lif": nir.LIF(tau=np.array([1.0, 2.0, 3.0]), r=one, v_leak=0 * one, v_threshold=one),
        "out": nir.Output(output_type={"output": np.array([3])})}, edges=[("in", "lif"), ("lif", "out")])
    with pytest.raises(UnsupportedOp, match="'lif': per-neuron tau values differ"):
        snnc.from_nir(per_neuron_tau, dt=0.1)
    cuba = nir.NIRGraph(nodes={
        "in": nir.Input(input_type={"input": np.array([3])}),
        "syn": nir.CubaLIF(tau_syn=np.array([1.0, 1.0, 2.0]), tau_mem=one, r=one, v_leak=0 * one, v_threshold=one),
        "out": nir.Output(output_type={"output": np.array([3])})}, edges=[("in", "syn"), ("syn", "out")])
    with pytest.raises(UnsupportedOp, match="'syn': per-neuron tau_syn values differ"):
        snnc.from_nir(cuba, dt=0.1)
    with pytest.raises(SnncError, match="'syn' \\(CubaLIF\\) has a time constant: pass dt="):
        snnc.from_nir(cuba)


def test_export_errors_and_files(tmp_path):
    bn = snnc.trace(nn.Sequential(nn.Linear(4, 3), LIF(tau=2.0), nn.BatchNorm1d(3)).eval(), torch.zeros(1, 4))
    with pytest.raises(UnsupportedOp, match="NIR has no BatchNorm node, and fold_bn: cannot fold node %_2"):
        snnc.to_nir(bn)
    ok = snnc.trace(nn.Sequential(nn.Linear(4, 3), IF(compare=">", reset="zero")), torch.zeros(1, 4))
    path = tmp_path / "g.nir"
    path.write_text("keep me")
    with pytest.raises(OverwriteError):
        snnc.to_nir(ok, path=path)
    assert path.read_text() == "keep me"
    with pytest.raises(FileFormatError, match="g.nir is not a readable NIR file"):
        snnc.from_nir(path)
    with pytest.raises(FileFormatError, match="does not exist"):
        snnc.from_nir(tmp_path / "missing.nir")


def test_spikingjelly_nir_export_imports_and_matches_spikingjelly():
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import functional, neuron
    from spikingjelly.activation_based.nir_exchange.to_nir import export_to_nir
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), neuron.IFNode(v_threshold=0.5), nn.Flatten(),
                      nn.Linear(4 * 36, 5), neuron.LIFNode(tau=2.0)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(4)
    x = torch.rand(10, 3, 2, 6, 6)
    g = export_to_nir(m, x[0], dt=1e-4)  # IF r = 1/dt, LIF tau = 2 dt: continuous-time parameters
    gm = snnc.from_nir(g, dt=1e-4)
    text = snnc.dump(gm)
    assert "snn.if(%1) {v_th=0.5, v_reset=0, reset=zero, compare=>}" in text and "mul" not in text
    assert "snn.lif(%4) {decay=0.5, decay_input=true, v_th=1, v_reset=0, reset=zero, compare=>}" in text
    functional.reset_net(m)
    with torch.no_grad():
        ref = torch.stack([m(xt) for xt in x])
    assert ref.sum() > 5 and torch.equal(snnc.run(gm, x, T=10), ref)


def test_to_nir_refuses_a_per_channel_initial_membrane_by_node():
    """Channel-wise conversion starts each channel's membrane at its own fraction of v_th; NIR
    has no initial-state field, so export names the node instead of failing on a tensor compare."""
    from snnc.errors import UnsupportedOp
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), snnc.ops.IF(v_init=0.0))
    g = snnc.trace(net.eval(), torch.zeros(1, 1, 4, 4))
    neuron = g.get_submodule("1")
    neuron.v_init = torch.tensor([0.25, 0.5]).view(2, 1, 1)
    with pytest.raises(UnsupportedOp, match=r"node .*per-channel membrane"):
        snnc.to_nir(g)
    neuron.v_init = torch.full((2, 1, 1), 0.25)   # uniform: written as the scalar it is
    assert snnc.to_nir(g) is not None
