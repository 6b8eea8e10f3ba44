"""snnc.convert: the one-call ANN -> SNN path and its errors."""
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
    per_step = snnc.convert(ann, calib)
    unrolled = snnc.convert(ann, calib, T=6)
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
    assert torch.allclose(snnc.run(g, x), snnc.run(snnc.convert(ann, calib, T=3), x), atol=1e-6)
    assert "snn.if" in (tmp_path / "02_threshold_balance.ir").read_text()


def test_convert_accepts_datasets_and_data_splits():
    from snnc.data import digits, from_spec
    ann = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 10)).eval()
    a = snnc.convert(ann, from_spec("digits", "train"), T=2)
    b = snnc.convert(ann, digits(), T=2)
    x = torch.rand(3, 1, 8, 8)
    assert torch.allclose(snnc.run(a, x), snnc.run(b, x), atol=1e-6)
