"""Data in the published formats through snnc end to end: the NIR paper's N-MNIST CNN
(written by sinabs) over N-MNIST-format event files, and an ANN->SNN conversion calibrated on
CIFAR-10-format batches."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import snnc
from snnc.data import nir_paper_dir
from snnc.data import dataset, time_first
from snnc.data.writers import write_cifar10, write_nmnist
from snnc.passes import unroll_timesteps

PAPER_CNN = nir_paper_dir() / "cnn_sinabs.nir"


def test_nir_paper_cnn_over_nmnist_files(tmp_path):
    pytest.importorskip("tonic")
    pytest.importorskip("nir")
    pytest.importorskip("snnc.nir")
    if not PAPER_CNN.exists():
        pytest.skip(f"{PAPER_CNN} not here")
    write_nmnist(tmp_path, per_class=1, events=3000)
    T = 10
    graph = snnc.from_nir(PAPER_CNN)
    unrolled = unroll_timesteps(graph, T=T)
    counts = []
    for x, y in DataLoader(dataset("nmnist", tmp_path, "test", T=T), batch_size=5):
        seq = time_first(x)                       # [T, N, 2, 34, 34] event counts per bin
        out = snnc.run(graph, seq, T=T)           # per-step reference: [T, N, 10] output spikes
        assert out.shape == (T, 5, 10)
        assert torch.equal(snnc.run(unrolled, seq), out)
        counts.append(out.sum(0))
    counts = torch.cat(counts)
    assert counts.shape == (10, 10) and counts.sum() > 0   # the classifier layer fires


def _cifar_ann():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 8 * 8, 16), nn.ReLU(), nn.Linear(16, 10))


def test_conversion_calibrated_on_cifar10_batches(tmp_path):
    tb = pytest.importorskip("snnc.passes.threshold_balance")
    write_cifar10(tmp_path, per_batch=8, binary=True)
    train = DataLoader(dataset("cifar10", tmp_path, "train", normalize="standard"), batch_size=16)
    x_test, _ = next(iter(DataLoader(dataset("cifar10", tmp_path, "test", normalize="standard"), batch_size=8)))
    torch.manual_seed(0)
    ann = _cifar_ann().eval()
    g = snnc.trace(ann, x_test[:1])
    snn = tb.threshold_balance(g, train, method="max")
    T = 256
    with torch.no_grad():
        want = ann(x_test)
        got = snnc.run(unroll_timesteps(snn, T=T), x_test)
    # max-calibrated rate code: each layer's rate error is O(1/T); the readout follows the logits
    err = (got - want).abs().max() / want.abs().max()
    assert err < 0.1, f"relative error {err:.3f}"
    assert (got.argmax(1) == want.argmax(1)).float().mean() >= 0.75


def test_cli_compile_and_run_on_an_nmnist_folder(tmp_path, capsys):
    pytest.importorskip("tonic")
    pytest.importorskip("nir")
    cli = pytest.importorskip("snnc.cli")
    if not PAPER_CNN.exists():
        pytest.skip(f"{PAPER_CNN} not here")
    write_nmnist(tmp_path / "nm", per_class=1, events=2000)
    assert cli.main(["compile", str(PAPER_CNN), "--T", "6", "--target", "torch", "-o", str(tmp_path / "cnn.pt")]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(tmp_path / "cnn.pt"), "--data", f"nmnist:{tmp_path / 'nm'}", "--T", "6"]) == 0
    assert "(10 samples)" in capsys.readouterr().out
    assert cli.main(["run", str(tmp_path / "cnn.pt"), "--data", f"nmnist:{tmp_path / 'nope'}", "--T", "6"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not exist" in err and "n-mnist" in err


def test_cli_convert_calibrated_on_a_cifar10_folder(tmp_path, capsys):
    cli = pytest.importorskip("snnc.cli")
    pytest.importorskip("snnc.conversion")
    write_cifar10(tmp_path / "c", per_batch=8, binary=True)
    torch.save(_cifar_ann().eval(), tmp_path / "ann.pt")
    spec = f"cifar10:{tmp_path / 'c'}"
    assert cli.main(["compile", str(tmp_path / "ann.pt"), "--trust-model-file", "--convert", "--calib", spec, "--T", "8",
                     "--target", "torch", "-o", str(tmp_path / "snn.pt")]) == 0
    capsys.readouterr()
    assert cli.main(["run", str(tmp_path / "snn.pt"), "--data", spec]) == 0
    assert "(8 samples)" in capsys.readouterr().out       # the 8 images of test_batch.bin
