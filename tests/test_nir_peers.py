"""NIR graphs that peers wrote: the NIR paper's recurrent Braille graphs (written by snntorch),
snntorch's ``export_to_nir`` and norse's ``to_nir`` of models in their own tutorial style, and the
warnings, by node, where a writer runs its graph otherwise than NIR's equations say."""

import contextlib
import io

import numpy as np
import pytest
import torch
from torch import nn

import snnc
from snnc.data import nir_paper_dir
from snnc.ops import CurrentLIF

nir = pytest.importorskip("nir")
PAPER = nir_paper_dir()
needs_paper = pytest.mark.skipif(not PAPER.exists(), reason="NIR paper graphs not present")


def _agreement(a, b):
    return float((a == b).float().mean())


def _nir_reference_braille(g, x, dt):
    """The Braille graph run from NIR's equations alone (numpy, float64): Affine/Linear, CubaLIF
    by forward Euler (reset to v_reset at the spike, fire on v > v_threshold), and the recurrent
    edge lif1 -> w_rec -> lif1 carrying the previous step's spikes (zero before step 0)."""
    def affine(name, v):
        n = g.nodes[name]
        return v @ np.asarray(n.weight, np.float64).T + (np.asarray(n.bias, np.float64) if hasattr(n, "bias") else 0)

    def cuba(name):
        n = g.nodes[name]
        p = {k: np.asarray(getattr(n, k), np.float64) for k in ("tau_syn", "tau_mem", "r", "v_leak", "v_threshold",
                                                               "v_reset", "w_in")}

        def step(inp, state):
            i, v = state
            i = i + dt / p["tau_syn"] * (-i + p["w_in"] * inp)
            v = v + dt / p["tau_mem"] * (p["v_leak"] - v + p["r"] * i)
            s = (v > p["v_threshold"]).astype(np.float64)
            return s, (i, np.where(s > 0, p["v_reset"], v))
        return step, p
    lif1, p1 = cuba("lif1.lif")
    lif2, p2 = cuba("lif2")
    xs = x.double().numpy()
    n1, n2 = p1["tau_syn"].shape[0], p2["tau_syn"].shape[0]
    st1 = (np.zeros((xs.shape[1], n1)), np.broadcast_to(p1["v_leak"], (xs.shape[1], n1)))
    st2 = (np.zeros((xs.shape[1], n2)), np.broadcast_to(p2["v_leak"], (xs.shape[1], n2)))
    s1, out = np.zeros((xs.shape[1], n1)), []
    for t in range(xs.shape[0]):
        s1, st1 = lif1(affine("fc1", xs[t]) + affine("lif1.w_rec", s1), st1)
        s2, st2 = lif2(affine("fc2", s1), st2)
        out.append(s2)
    return torch.from_numpy(np.stack(out)).float()


@needs_paper
@pytest.mark.parametrize("name", ["braille_noDelay_bias_zero", "braille_noDelay_noBias_subtract"])
def test_braille_graphs_import_and_run_as_nir_says(name):
    g = nir.read(PAPER / f"{name}.nir")
    with pytest.warns(UserWarning, match="NIR nodes lif2, lif1.lif \\(LIF/CubaLIF with r = tau/1e-4, as "
                                         "snntorch.export_to_nir writes"):
        gm = snnc.from_nir(g, dt=1e-4)
    text = snnc.dump(gm)
    width = g.nodes["fc1"].weight.shape[0]
    assert f"snn.feedback(%1) {{neuron=snn.current_lif, path=linear{width}, alpha=" in text
    assert text.count("snn.current_lif(") == 1 and "reset=zero, compare=>" in text
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(256, 8, 12, generator=gen) < 0.2).float()   # 12 taxel event channels
    out = snnc.run(gm, x, T=256)
    ref = _nir_reference_braille(g, x, 1e-4)
    assert ref.sum() > 20 and _agreement(out, ref) >= 0.999
    # to NIR and back: the same graph, the same spikes
    assert torch.equal(snnc.run(snnc.from_nir(snnc.to_nir(gm, dt=1e-4)), x, T=256), out)


def _snntorch_net(recurrent):
    import snntorch as snn

    class Net(nn.Module):   # snntorch tutorial style: init_hidden layers in a Module
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(10, 16)
            if recurrent:
                self.lif1 = snn.RSynaptic(alpha=torch.full((16,), 0.8), beta=torch.full((16,), 0.9),
                                          threshold=torch.ones(16), linear_features=16, init_hidden=True)
            else:
                self.lif1 = snn.Synaptic(alpha=torch.full((16,), 0.8), beta=torch.full((16,), 0.9),
                                         threshold=torch.ones(16), init_hidden=True)
            self.fc2 = nn.Linear(16, 4)
            self.lif2 = snn.Leaky(beta=torch.full((4,), 0.85), threshold=torch.ones(4), init_hidden=True, output=True)

        def forward(self, x):
            return self.lif2(self.fc2(self.lif1(self.fc1(x))))
    torch.manual_seed(0)
    net = Net()
    with torch.no_grad():
        net.fc1.weight.mul_(3)
        net.fc2.weight.mul_(2)
    return net


@pytest.mark.parametrize("recurrent", [False, True])
def test_snntorch_export_to_nir_imports_equal_to_snntorchs_own_run(recurrent):
    pytest.importorskip("snntorch")
    from snntorch import utils
    from snntorch.export_nir import export_to_nir
    net = _snntorch_net(recurrent)
    with contextlib.redirect_stdout(io.StringIO()):   # snntorch prints progress
        g = export_to_nir(net, torch.zeros(10))
    assert type(g.nodes["lif1.lif" if recurrent else "lif1"]).__name__ == "CubaLIF"
    x = torch.rand(100, 5, 10)
    utils.reset(net)
    with torch.no_grad():
        ref = torch.stack([net(x[t])[0] for t in range(100)])
    # snntorch's default reset (subtract, one step late) is not in NIR's fields: say so, by node ...
    with pytest.warns(UserWarning, match="NIR nodes .*lif2.* pass reset='subtract_after_leak'"):
        snnc.from_nir(g, dt=1e-4)
    # ... and with it, snnc runs snntorch's graph as snntorch does
    gm = snnc.from_nir(g, dt=1e-4, reset="subtract_after_leak")
    assert ("snn.feedback" in snnc.dump(gm)) == recurrent
    out = snnc.run(gm, x, T=100)
    assert ref.mean() > 0.05 and _agreement(out, ref) >= 0.999


def test_norse_to_nir_imports_equal_to_norses_own_import():
    norse = pytest.importorskip("norse.torch")
    torch.manual_seed(0)
    model = norse.SequentialState(nn.Linear(6, 8), norse.LIFCell(), nn.Linear(8, 3), norse.LIFCell())
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)
    g = norse.to_nir(model, torch.zeros(1, 6))
    assert type(g.nodes["1"]).__name__ == "CubaLIF"
    # norse 1.1 writes tau = dt / tau_inv (dt = 1e-3), i.e. time constants in units where one step is
    # dt**2: norse.from_nir(dt=1e-6) and snnc.from_nir(dt=1e-6) read them as the same discrete neuron
    norse_import = norse.from_nir(g, dt=1e-6)
    x = torch.rand(200, 5, 1, 6)
    state, out = None, []
    with torch.no_grad():
        for t in range(200):
            z, state = norse_import(x[t], state)
            out.append(z)
    ref = torch.stack(out)
    got = snnc.run(snnc.from_nir(g, dt=1e-6), x, T=200)
    assert ref.mean() > 0.02 and _agreement(got, ref) >= 0.999


def test_norse_lifcell_semantics_exported_as_cubalif_read_back_by_norse():
    """snnc's CurrentLIF in norse LIFCell's form equals LIFCell's own run, and ``to_nir`` writes it as
    a CubaLIF whose NIR meaning (read by norse's own NIR importer, not snnc's) is the same neuron."""
    norse = pytest.importorskip("norse.torch")
    dt, tau_syn_inv, tau_mem_inv = 1e-3, 200.0, 100.0
    cell = norse.LIFCell()   # defaults: tau_syn_inv 200, tau_mem_inv 100, v_th 1, dt 1e-3
    ours = CurrentLIF(alpha=1 - dt * tau_syn_inv, beta=1 - dt * tau_mem_inv, gain_in=1.0, gain=dt * tau_mem_inv)
    gm = snnc.trace(nn.Sequential(nn.Identity(), ours), torch.zeros(1, 7))
    torch.manual_seed(0)
    x = torch.rand(300, 4, 7) * 4
    state, out = None, []
    with torch.no_grad():
        for t in range(300):
            z, state = cell(x[t], state)
            out.append(z)
    ref = torch.stack(out)
    mine = snnc.run(gm, x, T=300)
    assert ref.mean() > 0.02 and _agreement(mine, ref) >= 0.999
    g = snnc.to_nir(gm, dt=dt)
    node = g.nodes["1"]
    assert type(node).__name__ == "CubaLIF" and np.allclose(node.w_in, 1 / (dt * tau_syn_inv))
    back = norse.from_nir(g, dt=dt)   # norse's reader: CubaLIF -> w_in, LIBox synapse, r, LIFBox
    state, out = None, []
    with torch.no_grad():
        for t in range(300):
            z, state = back(x[t], state)
            out.append(z)
    assert _agreement(torch.stack(out), ref) >= 0.999


def test_sinabs_default_iaf_graph_warns_by_node():
    sinabs = pytest.importorskip("sinabs")
    import sinabs.layers as sl
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), sl.IAFSqueeze(batch_size=2), nn.Linear(6, 4), sl.IAFSqueeze(batch_size=2))
    with torch.no_grad():
        model[0].weight.mul_(4)
    x = torch.rand(2 * 20, 8)
    g = sinabs.to_nir(model, x[:2])
    with pytest.warns(UserWarning, match="NIR nodes 1, 3 \\(IF with r=1, v_reset=0, as sinabs writes its IAF layers\\)"
                                         ".*MultiSpike and MembraneSubtract"):
        gm = snnc.from_nir(g)
    with torch.no_grad():
        ref = model(x).reshape(2, 20, 4).transpose(0, 1)   # IAFSqueeze: [batch*T, ...], batch-major
    out = snnc.run(gm, x.reshape(2, 20, 8).transpose(0, 1), T=20)
    assert ref.max() > 1   # MultiSpike: several spikes in one step, which NIR's IF cannot say
    assert _agreement(out, ref) < 0.99


def test_cli_nir_exports_the_zoo_digits_snn(tmp_path, capsys):
    from snnc.cli import main
    from snnc.zoo import digits_snn
    torch.save(digits_snn(8).eval(), tmp_path / "snn.pt")
    args = ["nir", str(tmp_path / "snn.pt"), "--trust-model-file", "--input-shape", "1,1,8,8", "-o", str(tmp_path / "d.nir")]
    assert main(args) == 0   # a pickled module: the user says they trust it
    out = capsys.readouterr().out
    assert "note: to_nir: readout 12 (mode=membrane)" in out and "wrote " in out and "11 NIR nodes" in out
    g = nir.read(tmp_path / "d.nir")
    assert sorted(type(n).__name__ for n in g.nodes.values()).count("LIF") == 3
    assert main(args) == 1
    assert "exists" in capsys.readouterr().err
