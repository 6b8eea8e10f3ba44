"""fold_bn: golden IR, exactness on random inputs and BN statistics, clear errors."""
import pytest
import torch
from torch import nn

import snnc
from snnc.errors import SnncError
from snnc.passes import fold_bn

GOLDEN_BEFORE = """\
graph(%0: f32[2,1,4,4]) {
  %1 : f32[2,3,4,4] = nn.conv2d(%0) {out=3, kernel=3, stride=1, pad=1} (weight=f32[3,1,3,3])  # 0
  %2 : f32[2,3,4,4] = nn.batch_norm(%1) {eps=1e-05} (weight=f32[3], bias=f32[3])  # 1
  %3 : f32[2,3,4,4] = nn.relu(%2)  # 2
  %4 : f32[2,48] = nn.flatten(%3) {start_dim=1}  # 3
  %5 : f32[2,5] = nn.linear(%4) {out=5} (weight=f32[5,48], bias=f32[5])  # 4
  %6 : f32[2,5] = nn.batch_norm(%5) {eps=1e-05} (weight=f32[5], bias=f32[5])  # 5
  return %6
}
"""
GOLDEN_AFTER = """\
graph(%0: f32[2,1,4,4]) {
  %1 : f32[2,3,4,4] = nn.conv2d(%0) {out=3, kernel=3, stride=1, pad=1} (weight=f32[3,1,3,3], bias=f32[3])  # 0
  %2 : f32[2,3,4,4] = nn.relu(%1)  # 2
  %3 : f32[2,48] = nn.flatten(%2) {start_dim=1}  # 3
  %4 : f32[2,5] = nn.linear(%3) {out=5} (weight=f32[5,48], bias=f32[5])  # 4
  return %4
}
"""


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
            if m.affine:
                m.weight.data.uniform_(0.5, 2)
                m.bias.data.uniform_(-1, 1)
    return model.eval()


def tiny():
    return _randomise_bn(nn.Sequential(nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
                                       nn.Flatten(), nn.Linear(48, 5), nn.BatchNorm1d(5)))


def test_golden_ir_before_and_after():
    g = snnc.trace(tiny(), torch.zeros(2, 1, 4, 4))
    assert snnc.dump(g) == GOLDEN_BEFORE
    assert snnc.dump(fold_bn(g)) == GOLDEN_AFTER
    assert snnc.dump(g) == GOLDEN_BEFORE          # the input graph is not modified


@pytest.mark.parametrize("model, shape", [
    (lambda: tiny(), (7, 1, 4, 4)),
    (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, bias=True), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(),
                           nn.Conv2d(4, 4, 3, groups=2), nn.BatchNorm2d(4)), (5, 2, 9, 9)),
    (lambda: nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6), nn.ReLU()), (4, 3, 11)),
    (lambda: nn.Sequential(nn.Linear(10, 8), nn.BatchNorm1d(8, affine=False), nn.ReLU()), (6, 10)),
])
def test_fold_is_exact_on_random_inputs(model, shape):
    m = _randomise_bn(model())
    g = fold_bn(snnc.trace(m, torch.zeros(shape)))
    assert not any(isinstance(mod, (nn.BatchNorm1d, nn.BatchNorm2d)) for mod in g.modules())
    x = torch.randn(shape) * 3
    with torch.no_grad():
        assert (g(x) - m(x)).abs().max().item() <= 1e-5


def test_bn_without_foldable_predecessor_is_an_error():
    g = snnc.trace(nn.Sequential(nn.BatchNorm2d(1), nn.Conv2d(1, 2, 3)).eval(), torch.zeros(1, 1, 5, 5))
    with pytest.raises(SnncError, match=r"cannot fold node %_0 .*its input .* is a placeholder"):
        fold_bn(g)
    g = snnc.trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.BatchNorm2d(2)).eval(), torch.zeros(1, 1, 5, 5))
    with pytest.raises(SnncError, match=r"cannot fold node %_2 .*is a ReLU, not a Conv1d/Conv2d/Linear"):
        fold_bn(g)


def test_conv_with_two_users_is_an_error():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    g = snnc.trace(Two().eval(), torch.zeros(1, 1, 5, 5))
    with pytest.raises(SnncError, match=r"cannot fold node %bn .*also feeds %add"):
        fold_bn(g)
