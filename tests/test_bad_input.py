"""Bad input gets a clear SnncError naming the place, and nothing on disk is lost."""
import json
import os

import pytest
import torch
from torch import nn

import snnc
from snnc.differential import differential
from snnc.errors import FileFormatError, InputError, UnsupportedOp, VerifyError
from snnc.fileio import OverwriteError, bundle_bytes, read_bundle
from snnc.ops import LIF, DirectEncoder, Readout
from snnc.passes import unroll_timesteps


def _net():
    return nn.Sequential(DirectEncoder(), nn.Linear(4, 6), LIF(tau=2.0), nn.Linear(6, 3), Readout())


@pytest.fixture(scope="module")
def graph():
    return unroll_timesteps(snnc.trace(_net().eval(), torch.zeros(2, 4)), T=3)


@pytest.fixture(scope="module")
def onnx_module(graph):
    return snnc.compile(graph, target="onnx")


def test_wrong_input_shape_dtype_and_count_name_expected_and_given(onnx_module):
    with pytest.raises(InputError, match=r"input 0: expected shape \[2, 4\] \(any batch size\), got \[2, 5\]"):
        onnx_module(torch.zeros(2, 5))
    with pytest.raises(InputError, match=r"input 0: expected shape \[2, 4\].*got \[3, 2, 4\]"):
        onnx_module(torch.zeros(3, 2, 4))
    with pytest.raises(InputError, match="input 0: expected dtype float32, got float64"):
        onnx_module(torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(InputError, match=r"takes 1 input\(s\), got 2"):
        onnx_module(torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(InputError, match="expected a torch.Tensor, got ndarray"):
        onnx_module(torch.zeros(2, 4).numpy())


class Mystery(nn.Module):
    """An op that the IR knows (it has op_name/attrs) but that no compiled target lowers."""
    op_name = "snn.mystery"

    def forward(self, x):
        return torch.sin(x)

    def attrs(self):
        return {}


def test_op_no_target_supports_names_node_op_and_supported_list():
    g = unroll_timesteps(snnc.trace(nn.Sequential(nn.Linear(4, 4), Mystery(), LIF(tau=2.0)), torch.zeros(2, 4)), T=2)
    with pytest.raises(UnsupportedOp, match=r"node %_1 \(call_module '1'\): op snn.mystery has no onnx "
                                            r"lowering; supported: .*nn.conv2d.*snn.lif"):
        snnc.compile(g, target="onnx")
    report = differential(g, torch.rand(2, 2, 4))  # the harness lists it as skipped, with the reason
    assert "snn.mystery" in report.targets["onnx"].reason and report.targets["onnx"].status == "skipped"


@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_nan_weights_are_refused_at_compile(target):
    bad = unroll_timesteps(snnc.trace(_net(), torch.zeros(2, 4)), T=3)
    lin = next(n for n in bad.graph.nodes if n.op == "call_module" and isinstance(bad.get_submodule(n.target), nn.Linear))
    bad.get_submodule(lin.target).weight.data[0, 1] = float("nan")
    with pytest.raises(VerifyError, match=rf"node %{lin.name} .*'{lin.target}.weight' has 1 NaN/inf value\(s\) of 24"):
        snnc.compile(bad, target=target)


def test_nan_calibration_data_is_refused_naming_the_batch():
    from snnc.passes import threshold_balance
    from snnc.zoo import digits_cnn
    g = snnc.trace(digits_cnn(4, bn=False).eval(), torch.zeros(2, 1, 8, 8))
    calib = torch.rand(6, 1, 8, 8)
    calib[4, 0, 2, 2] = float("nan")
    with pytest.raises(InputError, match="calibration batch 1 contains 1 NaN/inf values"):
        threshold_balance(g, [calib[:3], calib[3:]])


def test_non_finite_neuron_attribute_is_refused():
    g = unroll_timesteps(snnc.trace(_net(), torch.zeros(2, 4)), T=3)
    lif = next(m for m in g.modules() if isinstance(m, LIF))
    lif.v_th = float("inf")
    with pytest.raises(VerifyError, match="attribute v_th=inf is not finite"):
        snnc.compile(g, target="onnx")


def _rebundle(path, edit_meta=None, artefact=None):
    """Rewrite an export with edited metadata or artefact bytes, hashes recomputed (a file that
    passes the integrity check, so the next layer of checks is what is tested)."""
    meta, files = read_bundle(path)
    meta.pop("files")
    if edit_meta:
        edit_meta(meta)
    if artefact is not None:
        files = {meta["artefact"]: artefact}
    path.write_bytes(bundle_bytes(meta, files))


def test_truncated_or_garbage_onnx_file_names_the_file(onnx_module, tmp_path):
    path = onnx_module.export(tmp_path / "net.onnx")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match=r"net.onnx is not a readable snnc compiled module \(truncated or corrupt\?\)"):
        snnc.load(path)
    path.write_bytes(data)
    _rebundle(path, artefact=b"\x00garbage" * 10)  # hashes right, artefact not ONNX
    with pytest.raises(FileFormatError, match=r"net.onnx \[model.onnx\] is not a valid ONNX model"):
        snnc.load(path)
    path.write_bytes(b"")
    with pytest.raises(FileFormatError, match="net.onnx is empty"):
        snnc.load(path)


def test_metadata_damage_or_mismatch_names_the_file(onnx_module, tmp_path):
    path = onnx_module.export(tmp_path / "net.onnx")
    data = path.read_bytes()
    _rebundle(path, lambda m: m["inputs"].append([[2, 4], "float32"]))
    with pytest.raises(FileFormatError, match=r"net.onnx \[model.onnx\] has 1 input\(s\) but its metadata lists 2"):
        snnc.load(path)
    path.write_bytes(data)
    _rebundle(path, lambda m: m.update(inputs="nonsense"))
    with pytest.raises(FileFormatError, match=r"net.onnx: malformed input spec in the metadata"):
        snnc.load(path)
    path.write_bytes(data)
    _rebundle(path, lambda m: m.update(target="tvm:int"))
    with pytest.raises(FileFormatError, match=r"net.onnx: metadata names target 'tvm:int'"):
        snnc.load(path)


def test_truncated_torch_module_and_saved_graph_name_the_file(graph, tmp_path):
    path = snnc.compile(graph, target="torch").export(tmp_path / "net.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match=r"net.pt is not a readable snnc compiled module \(truncated or corrupt\?\)"):
        snnc.load(path)
    g = tmp_path / "g.snnc"
    snnc.save(graph, g)
    g.write_bytes(g.read_bytes()[:100])
    with pytest.raises(FileFormatError, match=r"g.snnc is not a readable snnc graph file \(truncated or corrupt\?\)"):
        snnc.load_graph(g)


def test_export_refuses_to_overwrite_and_keeps_bytes(onnx_module, tmp_path):
    path = onnx_module.export(tmp_path / "net.onnx")
    before = path.read_bytes()
    other = snnc.compile(unroll_timesteps(snnc.trace(_net(), torch.zeros(2, 4)), T=2), target="onnx")
    with pytest.raises(OverwriteError, match="net.onnx exists; pass overwrite=True"):
        other.export(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.onnx"]  # one file: nothing beside it
    other.export(path, overwrite=True)
    assert snnc.load(path).spec["T"] == 2


def test_failing_export_leaves_no_partial_file(onnx_module, tmp_path, monkeypatch):
    def half_then_fail(tmp):
        with open(tmp, "wb") as f:
            f.write(onnx_module.model_bytes[:100])
        raise OSError("disk full")
    monkeypatch.setattr(onnx_module, "_write", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        onnx_module.export(tmp_path / "net.onnx")
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    def no_json(*a, **k):
        raise OSError("metadata write failed")
    monkeypatch.setattr("snnc.compiled.json.dumps", no_json)
    with pytest.raises(OSError, match="metadata write failed"):
        onnx_module.export(tmp_path / "net.onnx")
    assert os.listdir(tmp_path) == []  # the artefact written before the metadata was removed
