"""Hostile CLI tests: every bad argument is one line (usage errors exit 2, others exit 1), no
crafted file runs code through any command, nothing is overwritten without --overwrite, and
compile -> run works with the default batch for the torch and onnx targets."""
import json

import pytest
import torch

import snnc
from snnc import __version__
from snnc.cli import main

import hostile_util as H


@pytest.fixture
def cli(capsys):
    def run(*args):
        try:
            rc = main([str(a) for a in args])
        except SystemExit as e:  # argparse: usage errors and --version
            rc = e.code
        out = capsys.readouterr()
        return rc, out.out, out.err
    return run


@pytest.fixture
def files(tmp_path):
    g = H.graph()
    snnc.save(g, tmp_path / "g.snnc")
    from snnc.zoo import digits_snn
    torch.manual_seed(0)
    snnc.save(snnc.trace(digits_snn(4).eval(), torch.zeros(1, 1, 8, 8)), tmp_path / "digits.snnc")
    return tmp_path


USAGE = [  # (args after the file, the argument the error must name)
    (["run", "{g}", "--batch-size", "0"], "--batch-size"),
    (["run", "{g}", "--batch-size", "-3"], "--batch-size"),
    (["run", "{g}", "--batch-size", "x"], "--batch-size"),
    (["run", "{g}", "--threads", "-1"], "--threads"),
    (["run", "{g}", "--threads", "0"], "--threads"),
    (["run", "{g}", "--limit", "0"], "--limit"),
    (["run", "{g}", "--T", "0"], "--T"),
    (["run", "{g}", "--dt", "nan"], "--dt"),
    (["run", "{g}", "--split", "valid"], "--split"),
    (["compile", "{g}", "--input-shape", "a,b", "-o", "{o}"], "--input-shape"),
    (["compile", "{g}", "--input-shape", "1,0,8", "-o", "{o}"], "--input-shape"),
    (["compile", "{g}", "--input-shape", "100000,100000,100", "-o", "{o}"], "--input-shape"),
    (["compile", "{g}", "--T", "-2", "-o", "{o}"], "--T"),
    (["compile", "{g}", "--bits", "99", "-o", "{o}"], "--bits"),
    (["compile", "{g}", "--calib-samples", "0", "-o", "{o}"], "--calib-samples"),
    (["compile", "{g}", "--dt", "-1", "-o", "{o}"], "--dt"),
    (["compile", "{g}"], "-o/--output"),
    (["retrain", "{g}", "--lr", "nan", "-o", "{o}"], "--lr"),
    (["retrain", "{g}", "--lr", "inf", "-o", "{o}"], "--lr"),
    (["retrain", "{g}", "--lr", "-0.1", "-o", "{o}"], "--lr"),
    (["retrain", "{g}", "--epochs", "0", "-o", "{o}"], "--epochs"),
    (["retrain", "{g}", "--batch-size", "0", "-o", "{o}"], "--batch-size"),
    (["report", "{g}", "--samples", "0"], "--samples"),
    (["report", "{g}", "--T", "0"], "--T"),
    (["inspect", "{g}", "--dt", "0"], "--dt"),
    (["nir", "{g}", "--dt", "inf", "-o", "{o}"], "--dt"),
]


@pytest.mark.parametrize("args, name", USAGE, ids=[" ".join(a[:1] + a[2:]) for a, _ in USAGE])
def test_bad_arguments_are_usage_errors_naming_the_argument(files, cli, args, name):
    rc, out, err = cli(*[a.format(g=files / "g.snnc", o=files / "o") for a in args])
    assert rc == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("snnc ") and name in last, err
    assert not (files / "o").exists()


def test_bad_paths_are_one_line_and_nothing_is_overwritten(files, cli):
    d = files
    (d / "keep").write_text("keep")
    (d / "folder").mkdir()
    (d / "rep").mkdir()
    (d / "rep" / "report.md").write_text("mine")
    cases = [
        (["compile", d / "g.snnc", "--dump-ir", d / "keep", "-o", d / "o"], "--dump-ir"),
        (["compile", d / "g.snnc", "-o", d / "folder"], "is a directory"),
        (["compile", d / "g.snnc", "-o", d / "keep"], "exists; pass --overwrite"),
        (["nir", d / "g.snnc", "-o", d / "keep"], "exists; pass --overwrite"),
        (["retrain", d / "g.snnc", "--T", "2", "-o", d / "folder"], "is a directory"),
        (["report", d / "digits.snnc", "--samples", "8", "--T", "2", "--out", d / "keep"], "is a file"),
        (["report", d / "digits.snnc", "--samples", "8", "--T", "2", "--out", d / "rep"], "pass overwrite=True"),
        (["run", d / "folder"], "is a directory"),
        (["run", d / "keep"], "keep"),
        (["inspect", d / "keep"], "keep"),
        (["compile", d / "keep", "--model-class", "nope", "-o", d / "o"], "--model-class 'nope'"),
        (["compile", d / "keep", "--model-class", "os:path", "--input-shape", "1,8", "-o", d / "o"], "keep"),
    ]
    for args, msg in cases:
        rc, out, err = cli(*args)
        assert rc == 1, (args, err)
        assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
    assert (d / "keep").read_text() == "keep" and (d / "rep" / "report.md").read_text() == "mine"
    assert not (d / "o").exists()


def test_report_on_an_ann_warns(tmp_path, cli):
    from snnc.zoo import digits_cnn
    snnc.save(snnc.trace(digits_cnn(4).eval(), torch.zeros(1, 1, 8, 8)), tmp_path / "ann.snnc")
    rc, _, err = cli("report", tmp_path / "ann.snnc", "--samples", "8", "--T", "2", "--out", tmp_path / "r")
    assert rc == 0 and "warning: " in err and "no spiking neurons" in err


def test_version(cli):
    rc, out, _ = cli("--version")
    assert rc == 0 and out.strip() == f"snnc {__version__}"


def test_no_command_runs_a_crafted_pickle(files, cli):
    d = files
    marker = d / "marker"
    evil = d / "evil.pt"
    torch.save(H.Payload(marker), evil)
    commands = [["inspect", evil], ["compile", evil, "--input-shape", "1,8", "-o", d / "o"], ["run", evil],
                ["report", evil, "--samples", "8"], ["nir", evil, "-o", d / "o.nir"],
                ["retrain", evil, "--T", "2", "-o", d / "o"],
                ["report", d / "digits.snnc", "--ann", evil, "--samples", "8", "--T", "2", "--out", d / "r"]]
    for args in commands:
        rc, _, err = cli(*args)
        assert rc == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, (args, err)
        assert "--trust-model-file" in err or "trust=True" in err, (args, err)
    assert not marker.exists()
    # with the flag the user takes responsibility: a one-line warning, then the pickle is read
    rc, _, err = cli("inspect", evil, "--trust-model-file")
    assert marker.exists() and err.splitlines()[0].startswith("snnc inspect: warning: ")


@pytest.mark.parametrize("target", ["torch", "onnx"])
def test_compile_then_run_with_the_default_batch(files, cli, target):
    d = files
    rc, _, err = cli("compile", d / "digits.snnc", "--T", "4", "--target", target, "-o", d / "net")
    assert rc == 0, err
    rc, out, err = cli("run", d / "net", "--json")  # default batch size 256 > the traced batch of 1
    assert rc == 0, err
    res = json.loads(out)
    x = snnc.data.digits().x_test
    want = snnc.run(snnc.passes.unroll_timesteps(snnc.load_graph(d / "digits.snnc"), T=4), x).argmax(-1)
    acc = 100.0 * (want == snnc.data.digits().y_test).float().mean().item()
    assert res["samples"] == len(x) and res["accuracy"] == pytest.approx(acc)
