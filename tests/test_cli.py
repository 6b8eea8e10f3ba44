"""The snnc command line: compile -> run -> inspect -> nir -> report, exit codes and one-line errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import snnc
from snnc.fileio import read_bundle
from snnc.data import nir_paper_dir
from snnc.cli import main
from snnc.ops import LIF
from snnc.zoo import digits_snn


def snnc_cli(*args):
    """A real process: exit code, stdout, stderr as a shell user sees them."""
    r = subprocess.run([sys.executable, "-m", "snnc.cli", *map(str, args)], capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture
def cli(capsys):
    """In-process ``snnc ...``: (exit code, stdout, stderr); fast enough to check many cases."""
    def run(*args):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse usage errors
            rc = e.code
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


@pytest.fixture
def snn_files(tmp_path):
    torch.manual_seed(0)
    m = digits_snn(4).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(3)
    torch.save(m, tmp_path / "snn.pt")
    snnc.save(snnc.trace(m, torch.zeros(1, 1, 8, 8)), tmp_path / "snn.snnc")
    return tmp_path, m


def test_compile_run_inspect_end_to_end(snn_files, capsys):
    d, model = snn_files
    assert main(["compile", str(d / "snn.pt"), "--trust-model-file", "--input-shape", "1,1,8,8", "--T", "4",
                 "--dump-ir", str(d / "ir"), "-o", str(d / "out.pt")]) == 0
    assert "compiled" in capsys.readouterr().out
    assert sorted(p.name for p in (d / "ir").iterdir()) == ["00_input.ir", "01_unroll_timesteps.ir"]
    meta, _ = read_bundle(d / "out.pt")
    assert meta["target"] == "torch" and meta["T"] == 4
    # the compiled module computes what the reference does on the model itself
    x = snnc.data.digits().x_test
    want = snnc.run(snnc.trace(model, x[:1]), x[:64], T=4).argmax(-1)
    got = snnc.load(d / "out.pt")(x[:64]).argmax(-1)
    assert torch.equal(want, got)
    assert main(["run", str(d / "out.pt"), "--data", "digits", "--limit", "64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    y = snnc.data.digits().y_test[:64]
    assert res["samples"] == 64 and res["accuracy"] == pytest.approx(100.0 * (got == y).float().mean().item())
    assert res["latency_ms_per_batch"] > 0
    assert main(["inspect", str(d / "ir")]) == 0
    assert "+++ 01_unroll_timesteps.ir" in capsys.readouterr().out
    assert main(["run", str(d / "snn.snnc"), "--T", "4", "--limit", "64", "--json"]) == 0  # a graph file, unrolled
    assert json.loads(capsys.readouterr().out)["accuracy"] == res["accuracy"]


def test_nir_export_and_inspect_through_the_cli(tmp_path, capsys):
    pytest.importorskip("nir")
    g = snnc.trace(nn.Sequential(nn.Linear(4, 3), LIF(tau=2.0, reset="zero", compare=">")), torch.zeros(1, 4))
    snnc.save(g, tmp_path / "g.snnc")
    assert main(["nir", str(tmp_path / "g.snnc"), "-o", str(tmp_path / "g.nir"), "--dt", "1e-3"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "g.nir")]) == 0  # dt comes from the file's metadata
    assert capsys.readouterr().out.replace("n0", "0").replace("n1", "1") == snnc.dump(g)


def test_errors_are_one_line_with_exit_1(snn_files, cli):
    d, _ = snn_files
    torch.save(nn.Linear(2, 2).state_dict(), d / "sd.pt")
    cases = [
        (["compile", d / "snn.pt", "-o", d / "o.pt"], "can run code when read: save model.state_dict()"),
        (["compile", d / "snn.pt", "--trust-model-file", "-o", d / "o.pt"], "is a torch module: give --input-shape"),
        (["compile", d / "sd.pt", "--input-shape", "1,2", "-o", d / "o.pt"], "holds a state_dict: give the model class"),
        (["compile", d / "snn.snnc", "--target", "fpga", "-o", d / "o.pt"], "unknown target 'fpga'"),
        (["compile", d / "snn.snnc", "--convert", "-o", d / "o.pt"], "--convert needs --calib"),
        (["compile", d / "missing.pt", "-o", d / "o.pt"], "missing.pt does not exist"),
        (["run", d / "nothing.pt"], "does not exist"),
        (["run", d / "snn.pt", "--trust-model-file"], "compile it first"),
        (["run", d / "snn.snnc"], "per-step spiking graph: give --T"),
        (["run", d / "snn.snnc", "--T", "2", "--data", "cifar"], "unknown data set spec 'cifar'"),
        (["report", d / "snn.snnc", "--bench-json", d / "snn.pt", "--samples", "8", "--T", "2", "--out", d / "r"],
         "not a text file of JSON lines"),
    ]
    for args, msg in cases:
        rc, out, err = cli(*args)
        assert rc == 1, (args, err)
        errors = [line for line in err.strip().splitlines() if ": warning: " not in line]  # --trust-model-file's
        assert msg in err and "Traceback" not in err and len(errors) == 1, (args, err)
    assert not (d / "o.pt").exists()
    rc, _, err = snnc_cli("compile", d / "sd.pt", "--input-shape", "1,2", "-o", d / "o.pt")  # as a process
    assert rc == 1 and err.startswith("snnc compile: error: ") and "Traceback" not in err


def test_compile_a_state_dict_with_model_class(snn_files, cli, monkeypatch):
    d, model = snn_files
    (d / "usernets.py").write_text("from snnc.zoo import digits_snn\n\n\ndef Net():\n    return digits_snn(4)\n")
    monkeypatch.syspath_prepend(str(d))
    torch.save(model.state_dict(), d / "sd.pt")
    rc, _, err = cli("compile", d / "sd.pt", "--model-class", "usernets:Net", "--input-shape", "1,1,8,8", "--T", "4",
                     "-o", d / "out.snnc")
    assert rc == 0, err
    x = snnc.data.digits().x_test[:32]
    assert torch.equal(snnc.load(d / "out.snnc")(x), snnc.run(snnc.trace(model, x[:1]), x, T=4))
    rc, _, err = cli("compile", d / "sd.pt", "--model-class", "usernets:Nope", "--input-shape", "1,1,8,8", "-o", d / "o")
    assert rc == 1 and "cannot import it" in err


def test_compile_refuses_to_overwrite_and_usage_exit_2(snn_files, cli):
    d, _ = snn_files
    (d / "o.pt").write_text("keep")
    rc, _, err = cli("compile", d / "snn.snnc", "-o", d / "o.pt")
    assert rc == 1 and "o.pt exists; pass --overwrite" in err and (d / "o.pt").read_text() == "keep"
    rc, _, err = cli("compile", d / "snn.snnc")
    assert rc == 2 and "required: -o/--output" in err
    rc, _, err = cli("run")
    assert rc == 2


def test_features_of_other_helpers_fail_clearly_when_absent(snn_files, cli):
    d, _ = snn_files
    for args, feature in ((["--bits", "8"], "snnc.passes.quantize_integer"),
                          (["--convert", "--calib", "digits"], "snnc.conversion.convert")):
        try:
            import importlib
            mod, attr = feature.rsplit(".", 1)
            getattr(importlib.import_module(mod), attr)
            continue  # merged in: nothing to check here
        except (ImportError, AttributeError):
            pass
        rc, _, err = cli("compile", d / "snn.snnc", *args, "-o", d / "o.pt")
        assert rc == 1 and f"needs {feature}" in err and "Traceback" not in err


def test_report_writes_table_json_and_plots(snn_files, capsys):
    d, _ = snn_files
    bench = d / "bench.jsonl"
    bench.write_text("\n".join(json.dumps({"method": m, "T": T, "accuracy": a}) for m, T, a in
                               [("max", 2, 40.0), ("max", 8, 80.0), ("p99.9", 2, 55.0), ("p99.9", 8, 90.0)])
                     + "\nnot json\n")
    assert main(["report", str(d / "snn.snnc"), "--T", "4", "--samples", "32", "--bench-json", str(bench),
                 "--out", str(d / "rep")]) == 0
    out = capsys.readouterr().out
    assert "| layer | op | firing rate |" in out and "energy (45 nm, Horowitz 2014" in out
    for name in ("report.md", "report.json", "firing_rates.png", "accuracy_vs_T.png"):
        assert (d / "rep" / name).stat().st_size > 100
    assert (d / "rep" / "firing_rates.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_builtin_and_scripts(cli):
    rc, out, _ = cli("bench", "--builtin", "--quick")
    lines = [json.loads(line) for line in out.splitlines()]
    assert rc == 0 and lines[0]["impl"] == "torch eager (per step)" and lines[0]["ratio"] == 1.0
    torch_line = next(r for r in lines if r["impl"] == "snnc torch")
    assert torch_line["ms"] > 0 and torch_line["ratio"] > 0
    assert all("ratio" in r or "skipped" in r for r in lines)
    rc, _, err = cli("bench", "no_such_bench")
    assert rc == 1 and "no bench named 'no_such_bench'" in err and "frontends" in err


def test_retrain_unrolls_adds_surrogates_trains_and_saves(snn_files, cli):
    pytest.importorskip("snnc.training")
    d, _ = snn_files
    rc, out, err = cli("retrain", d / "snn.snnc", "--T", "2", "--limit", "64", "--batch-size", "32", "--epochs", "2", "-o", d / "rt.snnc")
    assert rc == 0, err
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["loss"] < rows[0]["loss"]
    g = snnc.load_graph(d / "rt.snnc")
    assert g.snnc_spec["T"] == 2 and "surrogate=" in snnc.dump(g)
    rc, _, err = cli("retrain", d / "snn.snnc", "-o", d / "rt2.snnc")
    assert rc == 1 and "give --T" in err


def test_compile_convert_matches_snnc_convert(tmp_path, cli):
    conversion = pytest.importorskip("snnc.conversion")
    from torch.utils.data import DataLoader, Subset
    from snnc.zoo import digits_cnn
    torch.manual_seed(0)
    ann = digits_cnn(4).eval()
    torch.save(ann, tmp_path / "ann.pt")
    rc, out, err = cli("compile", tmp_path / "ann.pt", "--trust-model-file", "--convert", "--calib", "digits", "--calib-samples", "128",
                       "--T", "4", "--dump-ir", tmp_path / "ir", "-o", tmp_path / "snn.pt")
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "ir").iterdir()) == ["00_input.ir", "01_convert.ir", "02_unroll_timesteps.ir"]
    assert "snn.if(" in (tmp_path / "ir" / "01_convert.ir").read_text()
    d = snnc.data.from_spec("digits", "train")
    calib = DataLoader(Subset(d, range(128)), batch_size=64)
    want = conversion.convert(ann, calib, T=4)
    x = snnc.data.digits().x_test[:32]
    assert torch.equal(snnc.load(tmp_path / "snn.pt")(x), snnc.run(want, x))


def test_compile_a_nir_file_from_another_library(tmp_path, cli):
    pytest.importorskip("nir")
    paper = nir_paper_dir() / "lif_norse.nir"
    if not paper.exists():
        pytest.skip("NIR paper graphs not present")
    rc, _, err = cli("compile", paper, "--T", "1000", "-o", tmp_path / "lif.pt")
    assert rc == 1 and "--dt" in err
    rc, _, err = cli("compile", paper, "--dt", "1e-4", "--T", "1000", "-o", tmp_path / "lif.pt")
    assert rc == 0, err
    from test_nir import paper_lif_input
    spikes = snnc.load(tmp_path / "lif.pt")(paper_lif_input())
    assert torch.nonzero(spikes[:, 0, 0]).flatten().tolist() == [460, 510, 710, 760]


def test_compile_spike_digits_auto_measures_on_calib_data(tmp_path, cli):
    pytest.importorskip("tvm")
    from snnc.targets.spike_conv import int8_isa
    sys.path.insert(0, os.path.dirname(__file__))
    from test_spike_blocks import grey_conv_net
    torch.save(grey_conv_net(), tmp_path / "snn.pt")
    common = ("compile", tmp_path / "snn.pt", "--trust-model-file", "--input-shape", "1,1,8,8", "--T", "4")
    rc, out, err = cli(*common, "--target", "onnx", "--spike-digits", "1", "-o", tmp_path / "a.onnx")
    assert rc == 1 and "--spike-digits is an option of the tvm:llvm target" in err and len(err.strip().splitlines()) == 1
    rc, out, err = cli(*common, "--target", "tvm:llvm", "--spike-digits", "auto", "-o", tmp_path / "b.so")
    assert rc == 1 and "needs --calib" in err
    rc, out, err = cli(*common, "--target", "tvm:llvm", "--spike-digits", "auto", "--calib", "digits",
                       "-o", tmp_path / "c.so")
    assert rc == 0, err
    meta = snnc.load(tmp_path / "c.so").meta
    if int8_isa() is None:   # no int8 spike kernels here: the digits are theirs, nothing to choose
        assert "spike_digits" not in meta
        return
    report = meta["spike_digits"]
    assert list(report) == ["2"]   # the second conv reads spikes; the first reads the image
    assert f"spike conv 2: {report['2']['digits']} int8 weight digit(s), " in out
    assert (report["2"]["digits"] == 1) == (report["2"]["agreement"] >= 0.999)
