"""Verifier, pass manager, save/load, compile registry, CLI and data."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import snnc
from snnc.errors import FileFormatError, InputError, SnncError, VerifyError
from snnc.fileio import OverwriteError
from snnc.ops import LIF, MergeTime
from snnc.zoo import digits_snn


@pytest.fixture
def snn_graph():
    return snnc.trace(digits_snn(4), torch.zeros(2, 1, 8, 8))


def test_verifier_rejects_broken_graph_and_names_node(snn_graph):
    g = snn_graph
    lif = next(n for n in g.graph.nodes if n.op == "call_module" and isinstance(g.get_submodule(n.target), LIF))
    g.add_submodule("bad_merge", MergeTime())
    with g.graph.inserting_after(lif):
        bad = g.graph.call_module("bad_merge", (lif,))
    lif.replace_all_uses_with(bad, delete_user_cb=lambda u: u is not bad)
    g.recompile()
    with pytest.raises(VerifyError, match=rf"node %{bad.name} .*time.merge needs a \[T, N, ...\] input"):
        snnc.verify(g)


def test_verifier_catches_stale_metadata(snn_graph):
    g = snn_graph
    conv = next(n for n in g.graph.nodes if n.op == "call_module" and isinstance(g.get_submodule(n.target), nn.Conv2d))
    g.get_submodule(conv.target).stride = (2, 2)
    with pytest.raises(VerifyError, match=f"node %{conv.name}"):
        snnc.verify(g)


def test_passmanager_runs_verifies_times_and_dumps(snn_graph, tmp_path):
    pm = snnc.PassManager([("unroll_timesteps", {"T": 3})], dump_dir=tmp_path)
    out = pm.run(snn_graph)
    assert [p.name for p in sorted(tmp_path.iterdir())] == ["00_input.ir", "01_unroll_timesteps.ir"]
    assert "@seq" in (tmp_path / "01_unroll_timesteps.ir").read_text()
    assert pm.timings[0][0] == "unroll_timesteps" and pm.timings[0][1] > 0
    assert out.snnc_spec["T"] == 3 and snn_graph.snnc_spec["T"] is None  # input untouched


def test_passmanager_unknown_pass_and_bad_pass():
    with pytest.raises(SnncError, match="unknown pass 'nope'.*unroll_timesteps"):
        snnc.PassManager(["nope"])
    with pytest.raises(SnncError, match="returned int"):
        snnc.PassManager([lambda gm: 3]).run(snnc.trace(nn.Linear(2, 2), torch.zeros(1, 2)))


def test_save_load_roundtrip_and_no_overwrite(snn_graph, tmp_path):
    p = tmp_path / "g.snnc"
    snnc.save(snn_graph, p)
    g2 = snnc.load_graph(p)
    assert snnc.dump(g2) == snnc.dump(snn_graph)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(snnc.run(g2, x, T=4), snnc.run(snn_graph, x, T=4))
    before = p.read_bytes()
    with pytest.raises(OverwriteError):
        snnc.save(snn_graph, p)
    assert p.read_bytes() == before


def test_load_corrupt_and_wrong_files(tmp_path):
    bad = tmp_path / "bad.snnc"
    bad.write_bytes(b"not a torch file at all")
    with pytest.raises(FileFormatError, match="bad.snnc"):
        snnc.load_graph(bad)
    other = tmp_path / "other.pt"
    torch.save({"a": 1}, other)
    with pytest.raises(FileFormatError, match="not an snnc graph"):
        snnc.load_graph(other)
    with pytest.raises(FileFormatError, match="does not exist"):
        snnc.load_graph(tmp_path / "missing.snnc")


def test_truncated_graph_file(snn_graph, tmp_path):
    p = tmp_path / "g.snnc"
    snnc.save(snn_graph, p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="g.snnc"):
        snnc.load_graph(p)


def test_torch_target_export_load_and_input_checks(snn_graph, tmp_path):
    g = snnc.passes.unroll_timesteps(snn_graph, T=4)
    m = snnc.compile(g, target="torch")
    x = torch.rand(5, 1, 8, 8)
    ref = snnc.run(g, x)
    assert torch.equal(m(x), ref)
    m.export(tmp_path / "net.pt")
    m2 = snnc.load(tmp_path / "net.pt")
    assert torch.equal(m2(x), ref)
    with pytest.raises(InputError, match=r"expected shape \[2, 1, 8, 8\] \(any batch size\), got \[5, 8, 8\]"):
        m(torch.rand(5, 8, 8))
    with pytest.raises(InputError, match="expected dtype float32, got float64"):
        m(x.double())
    with pytest.raises(SnncError, match="unknown target 'fpga'"):
        snnc.compile(g, target="fpga")


def test_cli_inspect_graph_and_dump_dir(snn_graph, tmp_path):
    p = tmp_path / "g.snnc"
    snnc.save(snn_graph, p)
    r = subprocess.run([sys.executable, "-m", "snnc.cli", "inspect", str(p)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == snnc.dump(snn_graph)
    snnc.PassManager([("unroll_timesteps", {"T": 2})], dump_dir=tmp_path / "ir").run(snn_graph)
    r = subprocess.run([sys.executable, "-m", "snnc.cli", "inspect", str(tmp_path / "ir")], capture_output=True, text=True)
    assert r.returncode == 0 and "+++ 01_unroll_timesteps.ir" in r.stdout and "+  %" in r.stdout


def test_cli_errors_on_corrupt_or_missing_file(tmp_path):
    bad = tmp_path / "x.snnc"
    bad.write_bytes(b"\x00\x01garbage")
    r = subprocess.run([sys.executable, "-m", "snnc.cli", "inspect", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1 and "x.snnc" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "snnc.cli", "inspect", str(tmp_path / "none")], capture_output=True, text=True)
    assert r.returncode == 1 and "does not exist" in r.stderr
    r = subprocess.run([sys.executable, "-m", "snnc.cli"], capture_output=True, text=True)
    assert r.returncode == 2 and "inspect" in r.stdout


def test_digits_data():
    d = snnc.data.digits()
    assert d.x_train.shape[1:] == (1, 8, 8) and d.x_train.dtype == torch.float32
    assert len(d.x_train) + len(d.x_test) == 1797
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert set(d.y_test.unique().tolist()) == set(range(10))
