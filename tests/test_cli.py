"""The snnc command line: compile -> run -> inspect -> nir -> report, exit codes and one-line errors."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import snnc
from snnc.cli import main
from snnc.ops import IF, LIF, Readout
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
    assert main(["compile", str(d / "snn.pt"), "--input-shape", "1,1,8,8", "--T", "4", "--dump-ir", str(d / "ir"),
                 "-o", str(d / "out.pt")]) == 0
    assert "compiled" in capsys.readouterr().out
    assert sorted(p.name for p in (d / "ir").iterdir()) == ["00_input.ir", "01_unroll_timesteps.ir"]
    meta = json.loads((d / "out.pt.snnc.json").read_text())
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
        (["compile", d / "snn.pt", "-o", d / "o.pt"], "is a torch module: give --input-shape"),
        (["compile", d / "sd.pt", "--input-shape", "1,2", "-o", d / "o.pt"], "holds a dict (a state_dict?)"),
        (["compile", d / "snn.snnc", "--target", "fpga", "-o", d / "o.pt"], "unknown target 'fpga'"),
        (["compile", d / "snn.snnc", "--convert", "-o", d / "o.pt"], "--convert needs --calib"),
        (["compile", d / "missing.pt", "-o", d / "o.pt"], "missing.pt does not exist"),
        (["run", d / "nothing.pt"], "does not exist"),
        (["run", d / "snn.pt"], "compile it first"),
        (["run", d / "snn.snnc", "--data", "cifar"], "unknown data set spec 'cifar'"),
        (["report", d / "snn.snnc", "--bench-json", d / "snn.pt", "--samples", "8", "--T", "2", "--out", d / "r"],
         "not a text file of JSON lines"),
    ]
    for args, msg in cases:
        rc, out, err = cli(*args)
        assert rc == 1, (args, err)
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (d / "o.pt").exists()
    rc, _, err = snnc_cli("compile", d / "sd.pt", "--input-shape", "1,2", "-o", d / "o.pt")  # as a process
    assert rc == 1 and err.startswith("snnc compile: error: ") and "Traceback" not in err


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
