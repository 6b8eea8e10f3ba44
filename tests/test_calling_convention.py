"""One calling convention, checked: a per-step graph takes one [N, ...] step per call, a multi-step
graph the [T, N, ...] sequence it was unrolled for; anything else is refused naming both shapes and
what to call instead, never silently reinterpreted. snnc.run, unroll_timesteps and the compiled
modules agree on the numbers."""
import numpy as np
import pytest
import torch
from torch import nn

import snnc
from snnc.data import nir_paper_dir
from snnc.errors import InputError
from snnc.ops import LIF, Readout
from snnc.passes import fold_bn, unroll_timesteps

PAPER = nir_paper_dir()


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), LIF(tau=2.0))
    net[0].weight.data.abs_()
    return net


def test_per_step_graph_refuses_a_sequence_naming_both_shapes_and_the_fix():
    g = snnc.trace(_net(), torch.zeros(2, 4))
    x = torch.rand(10, 2, 4)
    with pytest.raises(InputError, match=r"one time step per call and expects shape \[2, 4\] .*got \[10, 2, 4\].*"
                                         r"snnc.run\(g, x, T=10\).*unroll_timesteps\(g, T=10\)"):
        g(x)
    seq = snnc.run(g, x, T=10)
    assert 0 < seq.mean() < 1
    assert torch.equal(seq, unroll_timesteps(g, T=10)(x))
    snnc.reset(g)
    assert torch.equal(torch.stack([g(x[t]) for t in range(10)]), seq)   # one step per call is fine
    snnc.reset(g)


def test_graphs_from_passes_and_files_keep_the_check(tmp_path):
    g = fold_bn(snnc.trace(_net(), torch.zeros(2, 4)))
    with pytest.raises(InputError, match="one time step per call"):
        g(torch.rand(3, 2, 4))
    snnc.save(g, tmp_path / "g.pt")
    loaded = snnc.load_graph(tmp_path / "g.pt")
    with pytest.raises(InputError, match="one time step per call"):
        loaded(torch.rand(3, 2, 4))


def test_multi_step_graph_refuses_another_T_or_one_step():
    u = unroll_timesteps(snnc.trace(_net(), torch.zeros(2, 4)), T=8)
    with pytest.raises(InputError, match=r"unrolled for T=8 and expects shape \[8, 2, 4\].*got \[5, 2, 4\]"):
        u(torch.rand(5, 2, 4))
    with pytest.raises(InputError, match=r"unrolled for T=8 .*got \[2, 4\]"):
        u(torch.rand(2, 4))


def test_compiled_modules_name_the_layout_they_take():
    g = snnc.trace(_net(), torch.zeros(2, 4))
    u = unroll_timesteps(g, T=6)
    m = snnc.compile(u, target="onnx")
    x = torch.rand(6, 2, 4)
    assert torch.equal(m(x), snnc.run(g, x, T=6))
    with pytest.raises(InputError, match=r"expected shape \[6, 2, 4\].*got \[2, 4\].*T=6"):
        m(torch.rand(2, 4))


def test_encoded_graph_takes_one_static_input():
    net = nn.Sequential(snnc.ops.DirectEncoder(), nn.Linear(4, 6), LIF(), Readout())
    u = unroll_timesteps(snnc.trace(net, torch.zeros(2, 4)), T=5)
    x = torch.rand(2, 4)
    assert torch.allclose(u(x), snnc.run(snnc.trace(net, torch.zeros(2, 4)), x, T=5))
    with pytest.raises(InputError, match=r"encodes its T=5 time steps itself .*\[2, 4\].*got \[5, 2, 4\]"):
        u(torch.rand(5, 2, 4))


@pytest.mark.skipif(not PAPER.exists(), reason="NIR paper graphs not present")
def test_nir_lif_called_with_1000_steps_is_refused_and_run_gives_the_spikes():
    pytest.importorskip("nir")
    gm = snnc.from_nir(PAPER / "lif_norse.nir", dt=1e-4)
    csv = np.loadtxt(PAPER / "lif_norse.csv", delimiter=",")
    x = torch.tensor(csv[:, 0], dtype=torch.float32).reshape(1000, 1, 1)
    with pytest.raises(InputError, match=r"expects shape \[1, 1\].*got \[1000, 1, 1\].*T=1000"):
        gm(x)
    spikes = snnc.run(gm, x, T=1000)[:, 0, 0]
    assert torch.nonzero(spikes).flatten().tolist() == np.nonzero(csv[:, 2])[0].tolist()
