"""Readout calibration (passes/_readout_calibration.py): the per-class least-squares fit of the SNN's
readout to the ANN's logits, folded into the output layer, kept only when it lowers KL(ANN || SNN)
on held-out calibration inputs; its use by snnc.convert's default and the CLI."""
import copy

import pytest
import torch

import snnc
from snnc.errors import InputError
from snnc.passes import fold_bn, threshold_balance
from snnc.passes._readout_calibration import _readout_layer, calibrate_readout, kl_to_ann

from test_conversion import _cli, _trained_cnn

T = 2


def _outputs(snn, x):
    snnc.reset(snn)
    with torch.no_grad():
        for _ in range(T):
            y = snn(x)
    snnc.reset(snn)
    return y


def _lstsq(y, z):
    """Per-class (a, b) by torch.linalg.lstsq: the reference for the closed-form fit."""
    a, b = [], []
    for c in range(y.shape[1]):
        A = torch.stack([y[:, c], torch.ones_like(y[:, c])], 1).double()
        sol = torch.linalg.lstsq(A, z[:, c:c + 1].double(), driver="gelsd").solution[:, 0]
        a.append(sol[0])
        b.append(sol[1])
    return torch.stack(a).float(), torch.stack(b).float()


@pytest.fixture(scope="module")
def setup():
    ann, data = _trained_cnn()
    folded = fold_bn(snnc.trace(ann, data.x_train[:1]))
    return folded, data.x_train[:256], data.x_test[:128]


def test_fit_equals_least_squares_and_folds_into_the_output_layer(setup):
    """A readout mis-scaled and shifted per class (as deep rate-code errors do) is fitted back: the
    calibrated SNN's outputs are exactly the least-squares affine map of its old outputs, on unseen
    inputs too (the fit lives in the output layer's weights), and KL to the ANN drops."""
    folded, calib, x = setup
    snn = threshold_balance(folded, calib, method="mse", T_target=T)
    layer = _readout_layer(snn)
    with torch.no_grad():   # a systematic per-class error: scale 0.5..2.3, offset -1..1
        s = torch.linspace(0.5, 2.3, layer.weight.shape[0])
        layer.weight.mul_(s[:, None])
        layer.bias.mul_(s).add_(torch.linspace(-1, 1, layer.weight.shape[0]))
    before = copy.deepcopy(snn)
    y, z = _outputs(before, calib), folded(calib).detach()
    rep = calibrate_readout(snn, folded, [calib], T)
    assert rep["applied"] and rep["kl_held_out"][1] < 0.5 * rep["kl_held_out"][0]
    a, b = _lstsq(y, z)
    assert torch.allclose(_outputs(snn, x), a * _outputs(before, x) + b, atol=1e-3)
    assert kl_to_ann(_outputs(snn, calib), z) < 0.5 * kl_to_ann(y, z)
    assert sum(1 for _ in snn.graph.nodes) == sum(1 for _ in before.graph.nodes)   # same ops


def test_fit_is_kept_only_if_it_lowers_held_out_kl(setup):
    """The decision is the held-out comparison: recomputed here from the SNN's and ANN's outputs."""
    folded, calib, _ = setup
    for method, opts in (("mse", {}), ("percentile", {"channel_wise": True, "v_init_fraction": 0.5})):
        snn = threshold_balance(folded, calib, method=method, T_target=T, **opts)
        y, z = _outputs(snn, calib), folded(calib).detach()
        h = len(y) // 2
        a, b = _lstsq(y[:h], z[:h])
        kl0, kl1 = kl_to_ann(y[h:], z[h:]), kl_to_ann(a * y[h:] + b, z[h:])
        rep = calibrate_readout(snn, folded, [calib], T)
        assert rep["kl_held_out"] == pytest.approx([kl0, kl1], rel=1e-2)
        assert rep["applied"] == (kl1 < kl0)
        if not rep["applied"]:
            assert torch.equal(_outputs(snn, calib), y)   # untouched


def test_default_conversion_reports_and_reproduces_the_readout_calibration(setup):
    folded, calib, x = setup
    g = snnc.convert(folded, calib, T=4)
    rep = g.snnc_conversion
    rc = rep["readout_calibration"]
    assert rep["options"]["readout_calibration"] == rc["applied"] and len(rc["kl_held_out"]) == 2
    again = snnc.convert(folded, calib, T=4, **rep["options"])
    assert torch.equal(snnc.run(g, x), snnc.run(again, x))
    off = snnc.convert(folded, calib, T=4, readout_calibration=False)   # the user's choice is kept
    assert "readout_calibration" not in off.snnc_conversion
    assert off.snnc_conversion["options"]["readout_calibration"] is False


def test_readout_calibration_needs_calibration_data():
    from snnc.ops import use_qcfs
    ann = use_qcfs(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 8), torch.nn.ReLU(),
                                       torch.nn.Linear(8, 10)).eval())
    with pytest.raises(InputError, match="readout_calibration=True needs calibration data"):
        threshold_balance(snnc.trace(ann, torch.rand(1, 1, 8, 8)), None, method="qcfs", readout_calibration=True)


def test_cli_readout_calibration_matches_the_api(tmp_path, capsys):
    from torch.utils.data import DataLoader, Subset
    ann, _ = _trained_cnn()
    torch.save(ann, tmp_path / "ann.pt")
    rc, _, err = _cli(capsys, "compile", tmp_path / "ann.pt", "--trust-model-file", "--convert", "--calib", "digits",
                      "--calib-samples", "64", "--T", "2", "--method", "mse", "--readout-calibration",
                      "-o", tmp_path / "r.pt")
    assert rc == 0, err
    calib = DataLoader(Subset(snnc.data.from_spec("digits", "train"), range(64)), batch_size=64)
    want = snnc.convert(ann, calib, T=2, method="mse", readout_calibration=True)
    plain = snnc.convert(ann, calib, T=2, method="mse")
    x = snnc.data.digits().x_test[:32]
    assert torch.equal(snnc.load(tmp_path / "r.pt")(x), snnc.run(want, x))
    assert not torch.equal(snnc.run(want, x), snnc.run(plain, x))   # the fit was kept on these 64 inputs
