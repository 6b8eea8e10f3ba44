"""A 1-D conv net (audio / sequences) written as a plain torch ANN converts with ``snnc.convert``
and runs in every float target with the reference's numbers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snnc

T = 8


def _ann(pool):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(1, 8, 5, padding=2), nn.BatchNorm1d(8), nn.ReLU(), nn.AvgPool1d(2),
                        nn.Conv1d(8, 16, 3, padding=1), nn.BatchNorm1d(16), nn.ReLU(), pool,
                        nn.Flatten(), nn.Linear(16 * 8, 4))
    x = torch.randn(128, 1, 32)
    net.train()
    with torch.no_grad():
        net(x)   # BN running statistics that are not the identity
    return net.eval(), x


@pytest.mark.parametrize("pool", ["avg", "max"])
def test_conv1d_ann_converts_and_runs_in_every_float_target(pool):
    ann, x = _ann(nn.AvgPool1d(2) if pool == "avg" else nn.MaxPool1d(2))
    opts = {"max_pool": "spikes"} if pool == "max" else {}
    snn = snnc.convert(ann, x, T=T, **opts)
    dump = snnc.dump(snn)
    assert "nn.conv1d" in dump and f"nn.{pool}_pool1d" in dump and "nn.batch_norm" not in dump   # BN folded
    xs = x[:16]
    ref = snnc.run(snn, xs)
    with torch.no_grad():
        want = ann(xs)
    assert ref.shape == want.shape == (16, 4)
    # the rate code approximates the ANN: the classes mostly agree after T steps
    assert (ref.argmax(1) == want.argmax(1)).float().mean() >= 0.75
    assert (ref - want).abs().mean() < 0.5 * want.abs().mean()
    for target, o in [("torch", {}), ("onnx", {}), ("tvm:llvm", {"mode": "hybrid"}), ("tvm:llvm", {"mode": "relax"})]:
        if target.startswith("tvm"):
            pytest.importorskip("tvm")
        m = snnc.compile(snn, target=target, **o)
        got = m(xs) if getattr(m, "dynamic_batch", True) else torch.cat([m(xs[i:i + 1]) for i in range(len(xs))])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_fold_bn_folds_3d_batch_norm_into_conv3d():
    from snnc.passes import fold_bn
    net = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU())
    net[1].running_mean.uniform_(-1, 1)
    net[1].running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(2, 2, 4, 6, 6)
    g = fold_bn(snnc.trace(net, x))
    assert "nn.batch_norm" not in snnc.dump(g)
    torch.testing.assert_close(g(x), net(x), atol=1e-5, rtol=1e-5)


class _FunctionalANN(nn.Module):
    """The functional style: F.relu / F.avg_pool1d and ``x.view(x.size(0), -1)`` before the head."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv1d(1, 4, 3), nn.Linear(4 * 14, 3)

    def forward(self, x):
        y = F.avg_pool1d(F.relu(self.conv(x)), 2)
        return self.fc(y.view(y.size(0), -1))


def test_functional_1d_ann_with_view_by_size_converts():
    torch.manual_seed(0)
    ann, x = _FunctionalANN().eval(), torch.randn(64, 1, 30)
    snn = snnc.convert(ann, x, T=T)
    assert "view(%6, 8, %7, -1)" in snnc.dump(snn)   # the per-step view, run once on [T, N, ...]
    ref = snnc.run(snn, x[:8])
    with torch.no_grad():
        assert (ref - ann(x[:8])).abs().max() < 0.1
    for target, o in [("onnx", {}), ("tvm:llvm", {"mode": "relax"})]:
        if target.startswith("tvm"):
            pytest.importorskip("tvm")
        torch.testing.assert_close(snnc.compile(snn, target=target, **o)(x[:1]), snnc.run(snn, x[:1]),
                                   atol=1e-5, rtol=1e-5)
