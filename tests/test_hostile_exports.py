"""Hostile tests of compiled exports: crafted libraries and pickles run nothing, truncated,
flipped or swapped artefacts are clear errors (never a crash), a kill during export leaves the
old or the new export whole, any file name loads, libraries for a missing ISA are refused,
cache entries are verified and rebuilt."""
import os
import signal

import pytest
import torch

import snnc
from snnc.errors import FileFormatError, SnncError
from snnc.fileio import read_bundle

import hostile_util as H

pytest.importorskip("tvm")


pytestmark = pytest.mark.usefixtures("isolated_cache")  # one fresh snnc cache for this file


@pytest.fixture(scope="module")
def modules():
    return {t: H.compiled(t, mode="relax") if t == "tvm:llvm" else H.compiled(t) for t in H.TARGETS}


@pytest.fixture(scope="module")
def exports(modules, tmp_path_factory):
    d = tmp_path_factory.mktemp("exports")
    return {t: m.export(d / f"net_{t.replace(':', '_')}") for t, m in modules.items()}


@pytest.mark.parametrize("target", H.TARGETS)
@pytest.mark.parametrize("name", ["net", "net.tar", "net.o", "r.art", "net.so", "net.onnx"])
def test_any_name_exports_one_file_that_loads(modules, target, name, tmp_path):
    (tmp_path / f"{name}.so").write_bytes(b"the user's own file")  # loading X must not touch X.so
    m = modules[target]
    path = m.export(tmp_path / name)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, f"{name}.so"])
    x = H.inputs()
    assert torch.equal(snnc.load(path)(x), m(x))
    assert (tmp_path / f"{name}.so").read_bytes() == b"the user's own file"


@pytest.mark.parametrize("target", H.TARGETS)
def test_truncated_exports_are_clear_errors(exports, target, tmp_path):
    import tarfile
    data = exports[target].read_bytes()
    with tarfile.open(exports[target]) as tar:  # where the last member's bytes end (then tar padding)
        end = max(m.offset_data + m.size for m in tar.getmembers())
    for frac in (0.0005, 0.01, 0.25, 0.5, 0.75, 0.999):
        p = tmp_path / "cut"
        p.write_bytes(data[: max(1, int(end * frac))])
        with pytest.raises(FileFormatError, match="cut"):
            snnc.load(p)


@pytest.mark.parametrize("target", H.TARGETS)
def test_flipped_weight_bytes_are_detected(exports, target, tmp_path):
    data = bytearray(exports[target].read_bytes())
    meta, files = read_bundle(exports[target])
    art = files[meta["artefact"]]
    start = bytes(data).index(art)
    for off in (len(art) // 3, len(art) // 2, len(art) - 1):
        bad = bytearray(data)
        bad[start + off] ^= 0x01
        p = tmp_path / "flipped"
        p.write_bytes(bytes(bad))
        with pytest.raises(FileFormatError, match="does not match its recorded sha256"):
            snnc.load(p)


def test_swapped_artefacts_are_detected(exports, tmp_path):
    """The artefact of one export under the metadata of another (what a kill between two renames
    used to leave): refused, whichever pair."""
    for a in H.TARGETS:
        for b in H.TARGETS:
            if a == b:
                continue
            p = tmp_path / "swapped"
            p.write_bytes(exports[a].read_bytes())
            _, files_b = read_bundle(exports[b])
            H.rebundle(p, artefact=next(iter(files_b.values())), keep_hashes=True)
            with pytest.raises(FileFormatError):
                snnc.load(p)


@pytest.mark.parametrize("target", ["tvm:llvm", "tvm:int"])
def test_crafted_library_is_never_dlopened(exports, target, tmp_path):
    marker = tmp_path / "marker"
    evil = H.evil_so(tmp_path / "evil.so", marker)
    p = tmp_path / "crafted"
    p.write_bytes(exports[target].read_bytes())
    if target == "tvm:llvm":
        H.rebundle(p, artefact=evil, keep_hashes=True)  # hash of the real library, bytes of the evil one
    else:  # the kernels.so inside a tvm:int tar
        import io
        import tarfile
        _, files = read_bundle(p)
        inner = io.BytesIO()
        with tarfile.open(fileobj=io.BytesIO(files["module.tar"])) as src, tarfile.open(fileobj=inner, mode="w") as dst:
            for m in src.getmembers():
                blob = evil if m.name == "kernels.so" else src.extractfile(m).read()
                ti = tarfile.TarInfo(m.name)
                ti.size = len(blob)
                dst.addfile(ti, io.BytesIO(blob))
        H.rebundle(p, artefact=inner.getvalue(), keep_hashes=True)
    with pytest.raises(FileFormatError, match="does not match its recorded sha256"):
        snnc.load(p)
    bare = tmp_path / "bare.so"  # a plain library, not an snnc export
    bare.write_bytes(evil)
    with pytest.raises(FileFormatError, match="not an snnc compiled module"):
        snnc.load(bare)
    (tmp_path / "bare.so.snnc.json").write_text('{"format": "snnc-compiled", "target": "tvm:llvm"}')
    with pytest.raises(FileFormatError, match="trust=True"):  # the old layout: no hashes, no load
        snnc.load(bare)
    assert not marker.exists()


def test_pickle_in_a_torch_export_runs_nothing(exports, tmp_path):
    marker = tmp_path / "marker"
    p = tmp_path / "evil"
    p.write_bytes(exports["torch"].read_bytes())
    import io
    from snnc.fileio import bundle_bytes
    buf = io.BytesIO()
    torch.save({"w": H.Payload(marker)}, buf)
    H.rebundle(p, artefact=bundle_bytes({"format": "snnc-graph", "version": 2},
                                        {"graph.json": b"{}", "tensors.pt": buf.getvalue()}))
    with pytest.raises(FileFormatError, match="not a plain tensor file"):
        snnc.load(p)
    old = tmp_path / "old.pt"  # the old layout: a pickle beside a .snnc.json
    torch.save(H.Payload(marker), old)
    (tmp_path / "old.pt.snnc.json").write_text('{"format": "snnc-compiled", "target": "torch"}')
    with pytest.raises(FileFormatError, match="trust=True"):
        snnc.load(old)
    assert not marker.exists()


def test_library_for_a_missing_isa_is_refused(exports, tmp_path):
    p = tmp_path / "future"
    p.write_bytes(exports["tvm:llvm"].read_bytes())
    meta, _ = read_bundle(p)
    if not (meta.get("tvm_target") or {}).get("mcpu"):
        pytest.skip("built without mcpu")
    H.rebundle(p, lambda m: m["host_isa"]["features"].append("amx_fp8_from_the_future"))
    with pytest.raises(SnncError, match="amx_fp8_from_the_future, which this CPU .* lacks; recompile"):
        snnc.load(p)


@pytest.mark.parametrize("when", ["before_rename", "after_rename"])
@pytest.mark.parametrize("target", ["onnx", "tvm:llvm"])
def test_kill_during_overwrite_leaves_one_whole_export(modules, target, when, tmp_path):
    """SIGKILL the exporting process right before or after the one rename of
    ``export(overwrite=True)``: the file is the old export or the new one, whole."""
    old = modules[target].export(tmp_path / "net")
    x = H.inputs()
    torch.save(x, tmp_path / "x.pt")
    want_old = snnc.load(old)(x)
    mode = ", mode='relax'" if target == "tvm:llvm" else ""
    code = f"""
import os, signal, torch, snnc, hostile_util as H
from snnc import fileio
real = os.replace
def replace(src, dst):
    if {when!r} == "before_rename":
        os.kill(os.getpid(), signal.SIGKILL)
    real(src, dst)
    os.kill(os.getpid(), signal.SIGKILL)
g = H.graph()
[m for m in g.modules() if isinstance(m, torch.nn.Linear)][-1].bias.data.add_(0.5)
m = snnc.compile(g, target={target!r}{mode})
torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'new.pt')!r})
fileio.os.replace = replace  # the export's own rename (the compile's cache writes are done)
m.export({str(old)!r}, overwrite=True)
"""
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == -signal.SIGKILL, r.stderr
    got = snnc.load(old)(x)
    want = want_old if when == "before_rename" else torch.load(tmp_path / "new.pt")
    assert torch.equal(got, want) and not torch.equal(want_old, torch.load(tmp_path / "new.pt"))


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_exports_get_the_users_umask(modules, mask, tmp_path):
    old = os.umask(mask)
    try:
        p = modules["onnx"].export(tmp_path / "net")
    finally:
        os.umask(old)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask


def test_cache_entries_are_verified_and_rebuilt(tmp_path, monkeypatch):
    from snnc.targets import tvm_build
    monkeypatch.setenv("SNNC_CACHE_DIR", str(tmp_path / "cache"))
    marker = tmp_path / "marker"
    g = H.graph()
    x = H.inputs()
    tvm_build._MEMORY_CACHE.clear()
    want = snnc.compile(g, target="tvm:llvm", mode="relax")(x)
    entries = sorted((tmp_path / "cache" / "tvm").glob("*.so.snnc"))
    assert entries
    evil = H.evil_so(tmp_path / "evil.so", marker)
    for damage in ("truncate", "plant", "swap"):
        for e in entries:
            if damage == "truncate":
                e.write_bytes(e.read_bytes()[:4096])
            elif damage == "plant":
                e.write_bytes(evil)
            else:
                H.rebundle(e, artefact=evil, keep_hashes=True)
        tvm_build._MEMORY_CACHE.clear()  # as in a new process
        assert torch.equal(snnc.compile(g, target="tvm:llvm", mode="relax")(x), want)
        assert all(read_bundle(e)[1] for e in entries)  # rebuilt whole
    # a cache folder others can write into is not read (anyone could plant a library there)
    os.chmod(tmp_path / "cache" / "tvm", 0o777)
    for e in entries:
        e.write_bytes(evil)
    tvm_build._MEMORY_CACHE.clear()
    assert torch.equal(snnc.compile(g, target="tvm:llvm", mode="relax")(x), want)
    assert not marker.exists()
