"""snnc.convert: the one-call ANN -> SNN path, its default (recipe chosen per T), QCFS training,
and its errors."""
import copy
import functools

import pytest
import torch
from torch import nn

import snnc
from snnc.errors import InputError, SnncError
from snnc.ops import IF, QCFS
from snnc.zoo import digits_cnn


def test_convert_unrolled_equals_per_step_and_folds_bn():
    torch.manual_seed(0)
    ann = digits_cnn(4).eval()
    calib = torch.rand(32, 1, 8, 8)
    per_step = snnc.convert(ann, calib, method="percentile")
    unrolled = snnc.convert(ann, calib, T=6, method="percentile")
    assert unrolled.snnc_spec["T"] == 6 and per_step.snnc_spec["T"] is None
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.ReLU, nn.Dropout)) for m in unrolled.modules())
    assert sum(isinstance(m, IF) for m in unrolled.modules()) == 3
    x = torch.rand(5, 1, 8, 8)
    assert torch.allclose(snnc.run(unrolled, x), snnc.run(per_step, x, T=6), atol=1e-5)
    assert ann.training is False and any(isinstance(m, nn.BatchNorm2d) for m in ann.modules())  # untouched


def test_convert_accepts_loader_and_graph_and_mse_uses_T():
    ann = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.rand(40, 1, 8, 8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(40)), batch_size=16)
    g1 = snnc.convert(ann, loader, T=2, method="mse")
    g2 = snnc.convert(snnc.trace(ann, x[:3]), x, T=2, method="mse", T_target=2)
    assert torch.allclose(snnc.run(g1, x), snnc.run(g2, x), atol=1e-5)
    assert "v_init=0.5" in snnc.dump(g1)


def test_convert_qcfs_needs_no_calibration():
    ann = nn.Sequential(nn.Linear(6, 5), QCFS(L=2), nn.Linear(5, 2)).eval()
    g = snnc.convert(ann, method="qcfs", T=2, example=torch.zeros(1, 6))
    x = torch.randn(10, 6)
    assert torch.allclose(snnc.run(g, x), ann(x).detach(), atol=1e-5)


def test_convert_errors():
    ann = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(InputError, match="cannot infer the input shape"):
        snnc.convert(ann)
    with pytest.raises(InputError, match="T must be a positive int"):
        snnc.convert(ann, torch.rand(4, 6), T=0)
    with pytest.raises(SnncError, match="expected an nn.Module"):
        snnc.convert("model.pt", torch.rand(4, 6))


def test_pass_manager_pipeline_equals_convert(tmp_path):
    ann = digits_cnn(4).eval()
    calib = torch.rand(16, 1, 8, 8)
    pm = snnc.PassManager(["fold_bn", ("threshold_balance", {"calib": calib}), ("unroll_timesteps", {"T": 3})],
                          dump_dir=tmp_path)
    g = pm.run(snnc.trace(ann, calib[:1]))
    x = torch.rand(4, 1, 8, 8)
    assert torch.allclose(snnc.run(g, x), snnc.run(snnc.convert(ann, calib, T=3, method="percentile"), x),
                          atol=1e-6)
    assert "snn.if" in (tmp_path / "02_threshold_balance.ir").read_text()


def test_convert_accepts_datasets_and_data_splits():
    from snnc.data import digits, from_spec
    ann = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    a = snnc.convert(ann, from_spec("digits", "train"), T=2)
    b = snnc.convert(ann, digits(), T=2)
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(snnc.run(a, x), snnc.run(b, x), atol=1e-6)


@functools.lru_cache(maxsize=None)
def _trained_cnn(epochs=3):
    from snnc.data import digits
    from snnc.demo import train_ann
    data = digits()
    torch.manual_seed(0)
    return train_ann(digits_cnn(4), data, epochs=epochs), data


def test_default_picks_the_best_measured_recipe_for_T_and_reports_it():
    """method=None: every candidate is scored by agreement with the ANN on the calibration data at
    the T asked for; the chosen one scores best, the result equals converting with that choice, and
    at T=2 it beats the old default (percentile) on the test set."""
    from snnc.demo import accuracy
    ann, data = _trained_cnn()
    calib = data.x_train[:256]
    g = snnc.convert(ann, calib, T=2)
    rep = g.snnc_conversion
    assert rep["T"] == 2 and set(rep["scores"]) >= {"percentile", "mse", "mse-cw-bc"}
    best = max(v["agreement"] for v in rep["scores"].values())
    assert rep["scores"][rep["method"]]["agreement"] == best
    again = snnc.convert(ann, calib, T=2, **rep["options"])
    x = data.x_test
    assert torch.equal(snnc.run(g, x), snnc.run(again, x))
    old = snnc.convert(ann, calib, T=2, method="percentile")
    acc = accuracy(lambda v: snnc.run(g, v), x, data.y_test)
    assert acc > accuracy(lambda v: snnc.run(old, v), x, data.y_test) + 10
    fixed = snnc.convert(ann, calib, T=2, channel_wise=True)   # options given fix that choice
    assert all(o.get("channel_wise") for o in [fixed.snnc_conversion["options"]])


def test_accuracy_rises_with_T_under_the_default():
    """A tiny pre-trained CNN: the default conversion's test accuracy does not fall as T grows
    (2 -> 8 -> 32) and reaches the ANN's within 1.5 points at T=32."""
    from snnc.demo import accuracy
    ann, data = _trained_cnn()
    calib = data.x_train[:128]
    accs = [accuracy(lambda v: snnc.run(snnc.convert(ann, calib, T=T), v), data.x_test, data.y_test)
            for T in (2, 8, 32)]
    assert accs[0] <= accs[1] + 0.5 <= accs[2] + 1.0
    assert accuracy(ann, data.x_test, data.y_test) - accs[2] <= 1.5


def test_train_qcfs_then_default_conversion_uses_its_thresholds():
    """train_qcfs swaps the ReLUs for QCFS(L) with thresholds at each ReLU's 99.9th output
    percentile (epochs=0: nothing trained yet); the default conversion recognises a QCFS net and
    converts it with those thresholds; after a short fine-tune the SNN at T = L agrees with the
    QCFS ANN on nearly every test input (Bu 2022)."""
    from snnc.conversion import train_qcfs
    ann, data = _trained_cnn()
    ann = copy.deepcopy(ann)
    calib = data.x_train[:128]
    q0 = train_qcfs(ann, data, epochs=0, L=2, calib=calib)
    assert sum(isinstance(m, QCFS) for m in q0.modules()) == 3 and not any(isinstance(m, nn.ReLU) for m in q0.modules())
    relu_out = torch.relu(ann[1](ann[0](calib))).detach().flatten()   # the first conv-BN-ReLU, by hand
    want = torch.quantile(relu_out[relu_out > 0], 0.999)
    assert float(q0[2].threshold.detach()) == pytest.approx(float(want), rel=1e-4)
    q = train_qcfs(ann, data, epochs=1, L=2, calib=calib)
    g = snnc.convert(q, calib, T=2)
    assert g.snnc_conversion["method"] == "qcfs"
    x = data.x_test
    agree = (snnc.run(g, x).argmax(-1) == q(x).argmax(-1)).float().mean().item()
    assert agree >= 0.9
    with pytest.raises(InputError, match="L must be a positive int"):
        train_qcfs(ann, data, L=0)
    with pytest.raises(SnncError, match="no nn.ReLU module"):
        train_qcfs(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), data)


def test_max_pool_to_avg_pool_keeps_geometry_and_original():
    from snnc.conversion import max_pool_to_avg_pool
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Flatten())
    a = max_pool_to_avg_pool(m)
    assert isinstance(m[2], nn.MaxPool2d) and isinstance(a[2], nn.AvgPool2d)
    assert (a[2].kernel_size, a[2].stride, a[2].padding) == (3, 2, 1)
    x = torch.rand(2, 1, 8, 8)
    assert a(x).shape == m(x).shape and not torch.equal(a(x), m(x))


def _cli(capsys, *args):
    from snnc.cli import main
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_compile_convert_takes_every_conversion_option(tmp_path, capsys):
    """``snnc compile --convert`` passes --method/--channel-wise/--max-pool/--v-init-fraction/...
    to snnc.convert (same graph as the API call), reports the default's choice, and refuses
    conversion options without --convert."""
    from torch.utils.data import DataLoader, Subset
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(64, 10)).eval()
    torch.save(ann, tmp_path / "ann.pt")
    rc, out, err = _cli(capsys, "compile", tmp_path / "ann.pt", "--trust-model-file", "--convert", "--calib", "digits", "--calib-samples",
                        "64", "--T", "3", "--method", "percentile", "--q", "99", "--channel-wise", "--max-pool", "gate",
                        "--v-init-fraction", "0.25", "--reset", "zero", "-o", tmp_path / "a.pt")
    assert rc == 0, err
    d = snnc.data.from_spec("digits", "train")
    calib = DataLoader(Subset(d, range(64)), batch_size=64)
    want = snnc.convert(ann, calib, T=3, method="percentile", q=99.0, channel_wise=True, max_pool="gate",
                        v_init_fraction=0.25, reset="zero")
    x = snnc.data.digits().x_test[:16]
    assert torch.equal(snnc.load(tmp_path / "a.pt")(x), snnc.run(want, x))
    assert "mode=gate" in snnc.dump(want) and "conversion: percentile" in out
    rc, out, err = _cli(capsys, "compile", tmp_path / "ann.pt", "--trust-model-file", "--convert", "--calib", "digits", "--calib-samples",
                        "64", "--T", "2", "--no-bias-correction", "-o", tmp_path / "b.pt")
    assert rc == 0, err
    assert "chosen for T=2" in out and "agreement with the ANN" in out
    rc, out, err = _cli(capsys, "compile", tmp_path / "ann.pt", "--trust-model-file", "--convert", "--calib", "digits",
                        "--calib-samples", "64", "--T", "2", "--method", "mse", "--burst", "3", "-o", tmp_path / "e.pt")
    assert rc == 0, err
    want = snnc.convert(ann, calib, T=2, method="mse", burst=3)
    assert torch.equal(snnc.load(tmp_path / "e.pt")(x), snnc.run(want, x))
    assert "snn.burst_if" in snnc.dump(want) and "max_spikes=3" in snnc.dump(want)
    rc, _, err = _cli(capsys, "compile", tmp_path / "ann.pt", "--trust-model-file", "--input-shape", "1,1,8,8", "--channel-wise",
                      "-o", tmp_path / "c.pt")
    assert rc == 1 and "--channel-wise: conversion options need --convert" in err
    rc, _, err = _cli(capsys, "compile", tmp_path / "ann.pt", "--trust-model-file", "--convert", "--calib", "digits", "--max-pool", "avg",
                      "-o", tmp_path / "d.pt")
    assert rc == 2 and "--max-pool" in err
