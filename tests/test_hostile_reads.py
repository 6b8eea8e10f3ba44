"""Bounded reads: an export's ONNX model cannot point at other files, a NIR file cannot use HDF5
external storage or links or ask for unbounded memory, a compressed archive is never inflated."""
import gzip
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import snnc
from snnc.errors import FileFormatError
from snnc.fileio import read_bundle

import hostile_util as H


def test_onnx_external_data_is_refused(tmp_path, monkeypatch):
    """A location relative to the working directory passes onnx's checker: snnc refuses it."""
    onnx = pytest.importorskip("onnx")
    monkeypatch.chdir(tmp_path)
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.arange(16 * 8, dtype=np.float32).tobytes())
    path = H.compiled("onnx").export(tmp_path / "net")
    _, files = read_bundle(path)
    model = onnx.load_from_string(files["model.onnx"])
    t = next(t for t in model.graph.initializer if t.dims and np.prod(t.dims) == 16 * 8)
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = onnx.TensorProto.EXTERNAL
    for k, v in (("location", "secret.bin"), ("offset", "0"), ("length", str(16 * 8 * 4))):
        e = t.external_data.add()
        e.key, e.value = k, v
    H.rebundle(path, artefact=model.SerializeToString())
    with pytest.raises(FileFormatError, match=r"net \[model.onnx\]: tensor .* points to external data 'secret.bin'"):
        snnc.load(path)


def test_compressed_int_archive_is_not_inflated(tmp_path):
    pytest.importorskip("tvm")
    path = H.compiled("tvm:int").export(tmp_path / "net")
    _, files = read_bundle(path)
    H.rebundle(path, artefact=gzip.compress(files["module.tar"]))
    with pytest.raises(FileFormatError, match=r"net \[module.tar\] is not a readable tvm:int artefact"):
        snnc.load(path)


def test_bundle_member_sizes_are_bounded(tmp_path, monkeypatch):
    from snnc import fileio
    path = H.compiled("onnx").export(tmp_path / "net")
    monkeypatch.setattr(fileio, "MAX_MEMBER_BYTES", 1024)
    with pytest.raises(FileFormatError, match="claims .* bytes, over the bound"):
        snnc.load(path)


def test_bundle_with_links_or_unlisted_members_is_refused(tmp_path):
    path = H.compiled("onnx").export(tmp_path / "net")
    meta, files = read_bundle(path)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, blob in [("snnc.json", H.json.dumps(meta).encode()), *files.items()]:
            ti = tarfile.TarInfo(name)
            ti.size = len(blob)
            tar.addfile(ti, io.BytesIO(blob))
        link = tarfile.TarInfo("passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    path.write_bytes(buf.getvalue())
    with pytest.raises(FileFormatError, match="'passwd' is not a regular file"):
        snnc.load(path)


def _nir_file(tmp_path, name="g.nir", shape=(4,)):  # keep shapes small: the weights are real arrays
    nir = pytest.importorskip("nir")
    w = np.ones((3, shape[0]), dtype=np.float32) * 0.5
    g = nir.NIRGraph.from_list(nir.Input(np.array(shape)), nir.Affine(w, np.zeros(3, dtype=np.float32)),
                               nir.IF(np.ones(3, dtype=np.float32), np.ones(3, dtype=np.float32)),
                               nir.Output(np.array([3])))
    path = tmp_path / name
    nir.write(path, g)
    return path


def test_nir_file_reads_normally(tmp_path):
    gm = snnc.from_nir(_nir_file(tmp_path))
    assert "snn.if" in snnc.dump(gm)


def test_nir_external_storage_and_links_are_refused(tmp_path):
    h5py = pytest.importorskip("h5py")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\x01" * 48)
    path = _nir_file(tmp_path)
    with h5py.File(path, "a") as f:
        f.create_dataset("node/leak", shape=(12,), dtype="f4", external=[(str(secret), 0, 48)])
    with pytest.raises(FileFormatError, match="keeps its data in other files"):
        snnc.from_nir(path)
    path = _nir_file(tmp_path, "l.nir")
    with h5py.File(path, "a") as f:
        f["node/other"] = h5py.ExternalLink(str(tmp_path / "g.nir"), "/node")
    with pytest.raises(FileFormatError, match="is a link to"):
        snnc.from_nir(path)


def test_nir_sizes_are_bounded(tmp_path, monkeypatch):
    h5py = pytest.importorskip("h5py")
    from snnc import nir as snnc_nir
    path = _nir_file(tmp_path)
    with h5py.File(path, "a") as f:  # 4 MB of zeros, a few KB on disk
        f.create_dataset("node/pad", data=np.zeros(1 << 20, dtype=np.float32), compression="gzip")
    assert path.stat().st_size < 200_000
    monkeypatch.setattr(snnc_nir, "MAX_NIR_BYTES", 1 << 20)
    with pytest.raises(FileFormatError, match="hold more than 1 MiB"):
        snnc.from_nir(path)
    big = _nir_file(tmp_path, "big.nir")  # a 26 KB file whose input asks for 2**40 elements
    with h5py.File(big, "a") as f:
        del f["node/nodes/input/shape"]
        f["node/nodes/input/shape"] = np.array([1 << 20, 1 << 20])
    with pytest.raises(FileFormatError, match="the input at most"):
        snnc.from_nir(big)


def test_truncated_nir_file_is_a_clear_error(tmp_path):
    path = _nir_file(tmp_path)
    data = path.read_bytes()
    for frac in (0.1, 0.5, 0.9):
        p = tmp_path / "cut.nir"
        p.write_bytes(data[: int(len(data) * frac)])
        with pytest.raises(FileFormatError, match="cut.nir"):
            snnc.from_nir(p)


def test_native_kernel_library_is_not_loaded_from_a_folder_others_can_write(tmp_path):
    """The native scan library is a shared object snnc loads (runs): one planted in a cache folder
    that others can write must not be loaded; snnc builds its own in a private folder instead."""
    code = "import sys; from snnc.ops import native; lib = native.load(); print(lib._name if lib else '')"
    own = tmp_path / "own"
    built = H.run_python(code, env_extra={"SNNC_CACHE_DIR": str(own)}).stdout.strip()
    if not built:
        pytest.skip("no C compiler: native kernels unavailable")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    planted = shared / Path(built).name
    planted.write_bytes(b"not a library")   # loading it would fail: the test would see an error
    loaded = H.run_python(code, env_extra={"SNNC_CACHE_DIR": str(shared), "SNNC_CACHE": str(shared)}).stdout.strip()
    assert loaded and Path(loaded).parent != shared and planted.read_bytes() == b"not a library"
