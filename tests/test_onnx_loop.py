"""The onnx target's choice of loop form over T: ``loop="auto"`` (default) unrolls short loops and
writes one ONNX Scan per neuron from ``SCAN_FROM_T`` steps on, so the exported graph (and its
export time) stops growing with T; the CLI exposes the choice as ``--loop``."""
import pytest
import torch
from torch import nn

import snnc
from snnc.cli import main
from snnc.ops import IF, LIF
from snnc.passes import unroll_timesteps

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from snnc.targets.onnx import SCAN_FROM_T  # noqa: E402


def _net():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), LIF(tau=2.0), nn.Linear(5, 4), IF(v_th=0.7)).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.mul_(3)
    return net


def _nodes(m):
    return [n.op_type for n in onnx.load_from_string(m.model_bytes).graph.node]


def test_auto_unrolls_short_loops_and_scans_long_ones_bit_exactly():
    short, long_ = SCAN_FROM_T - 1, SCAN_FROM_T
    for T, form in ((short, "unroll"), (long_, "scan"), (2 * long_, "scan")):
        g = unroll_timesteps(snnc.trace(_net(), torch.zeros(3, 6)), T=T)
        m = snnc.compile(g, target="onnx")
        assert m.meta["loop"] == form
        assert ("Scan" in _nodes(m)) == (form == "scan")
        x = torch.rand(T, 3, 6) * 2
        ref = snnc.run(g, x)
        assert ref.sum() > 0 and torch.equal(m(x), ref)
    # the Scan graph is the same size whatever T: export work does not grow with T
    sizes = [len(_nodes(snnc.compile(unroll_timesteps(snnc.trace(_net(), torch.zeros(3, 6)), T=T), target="onnx")))
             for T in (SCAN_FROM_T, 3 * SCAN_FROM_T)]
    assert sizes[0] == sizes[1]
    unrolled = [len(_nodes(snnc.compile(unroll_timesteps(snnc.trace(_net(), torch.zeros(3, 6)), T=T), target="onnx",
                                        loop="unroll"))) for T in (4, 8)]
    assert unrolled[1] > unrolled[0]  # what auto avoids for long loops


def test_cli_loop_option(tmp_path, capsys):
    snnc.save(snnc.trace(_net(), torch.zeros(1, 6)), tmp_path / "n.snnc")
    assert main(["compile", str(tmp_path / "n.snnc"), "--T", "4", "--target", "onnx", "--loop", "scan",
                 "-o", str(tmp_path / "n.onnx")]) == 0
    loaded = snnc.load(tmp_path / "n.onnx")
    assert loaded.meta["loop"] == "scan"
    x = torch.rand(4, 2, 6) * 2
    assert torch.equal(loaded(x), snnc.run(unroll_timesteps(snnc.trace(_net(), torch.zeros(1, 6)), T=4), x))
    capsys.readouterr()
    rc = main(["compile", str(tmp_path / "n.snnc"), "--T", "4", "--loop", "scan", "-o", str(tmp_path / "t.pt")])
    err = capsys.readouterr().err
    assert rc == 1 and "--loop is an option of the onnx target" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "t.pt").exists()
    with pytest.raises(SystemExit):
        main(["compile", str(tmp_path / "n.snnc"), "--target", "onnx", "--loop", "wavy", "-o", str(tmp_path / "w")])
