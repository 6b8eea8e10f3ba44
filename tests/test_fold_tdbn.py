"""tdBN (Zheng 2021): statistics over (T, N, H, W) with the alpha*v_th scale; fold_tdbn golden IR
and numeric equality (<= 1e-5) with the unfolded graph."""
import pytest
import torch
from torch import nn

import snnc
from snnc.ops import LIF, DirectEncoder, Readout, TDBatchNorm
from snnc.passes import fold_tdbn, unroll_timesteps


# tiny tensors: one thread avoids thread-pool sync costs on a shared CPU
pytestmark = pytest.mark.usefixtures("one_thread")

GOLDEN_BEFORE = """\
graph(%0: f32[2,3,2,4,4]@seq) T=2 {
  %1 : f32[6,2,4,4]@flat = time.merge(%0)  # merge_time_1
  %2 : f32[6,3,4,4]@flat = nn.conv2d(%1) {out=3, kernel=3, stride=1, pad=1} (weight=f32[3,2,3,3])  # 0
  %3 : f32[6,3,4,4]@flat = snn.tdbn(%2) {alpha=0.707107, v_th=0.5, eps=1e-05} (weight=f32[3], bias=f32[3])  # 1
  %4 : f32[2,3,3,4,4]@seq = time.split(%3) {T=2}  # split_time_2
  %5 : spike[2,3,3,4,4]@seq = snn.lif(%4) {tau=2, v_th=0.5, reset=subtract}  # 2
  return %5
}
"""
GOLDEN_AFTER = """\
graph(%0: f32[2,3,2,4,4]@seq) T=2 {
  %1 : f32[6,2,4,4]@flat = time.merge(%0)  # merge_time_1
  %2 : f32[6,3,4,4]@flat = nn.conv2d(%1) {out=3, kernel=3, stride=1, pad=1} (weight=f32[3,2,3,3], bias=f32[3])  # 0
  %3 : f32[2,3,3,4,4]@seq = time.split(%2) {T=2}  # split_time_2
  %4 : spike[2,3,3,4,4]@seq = snn.lif(%3) {tau=2, v_th=0.5, reset=subtract}  # 2
  return %4
}
"""


def randomise_stats(gm):
    gen = torch.Generator().manual_seed(1)
    for m in gm.modules():
        if isinstance(m, TDBatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=gen) - 0.5)
    return gm.eval()


def test_tdbn_normalises_over_time_batch_and_space_with_threshold_scale():
    bn = TDBatchNorm(3, alpha=0.5, v_th=2.0).train()
    x = torch.randn(4, 5, 3, 6, 6) * 3 + 1            # [T, N, C, H, W]
    y = bn(x)
    mu = x.mean(dim=(0, 1, 3, 4), keepdim=True)
    var = x.var(dim=(0, 1, 3, 4), unbiased=False, keepdim=True)
    torch.testing.assert_close(y, 0.5 * 2.0 * (x - mu) / torch.sqrt(var + 1e-5))
    # the merged layout [T*N, C, H, W] gives the same values
    torch.testing.assert_close(TDBatchNorm(3, alpha=0.5, v_th=2.0).train()(x.flatten(0, 1)), y.flatten(0, 1))
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        bn(torch.zeros(3, 4))


def test_golden_ir_fold_tdbn():
    net = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), TDBatchNorm(3, alpha=2 ** -0.5, v_th=0.5),
                        LIF(tau=2.0, v_th=0.5))
    g = randomise_stats(unroll_timesteps(snnc.trace(net, torch.zeros(3, 2, 4, 4)), T=2))
    assert snnc.dump(g) == GOLDEN_BEFORE
    assert snnc.dump(fold_tdbn(g)) == GOLDEN_AFTER
    assert snnc.dump(g) == GOLDEN_BEFORE


def test_fold_matches_formula_within_1e_5():
    pre = nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), TDBatchNorm(5, alpha=0.7, v_th=1.3))
    g = randomise_stats(snnc.trace(pre, torch.zeros(4, 2, 6, 6)))
    f = fold_tdbn(g)
    x = torch.randn(4, 2, 6, 6)
    assert (f(x) - g(x)).abs().max() <= 1e-5
    assert not any(isinstance(m, TDBatchNorm) for m in f.modules())


def test_fold_whole_snn_per_step_and_unrolled():
    net = nn.Sequential(DirectEncoder(), nn.Conv2d(1, 4, 3, padding=1), TDBatchNorm(4, v_th=0.5),
                        LIF(tau=2.0, v_th=0.5), nn.Conv2d(4, 4, 3, padding=1, bias=False), TDBatchNorm(4),
                        LIF(tau=2.0), nn.Flatten(), nn.Linear(256, 3), Readout())
    g = randomise_stats(snnc.trace(net, torch.zeros(2, 1, 8, 8)))
    x = torch.rand(3, 1, 8, 8)
    assert (snnc.run(fold_tdbn(g), x, T=4) - snnc.run(g, x, T=4)).abs().max() <= 1e-5
    u = unroll_timesteps(g, T=4)
    assert (fold_tdbn(u)(x) - u(x)).abs().max() <= 1e-5


def test_tdbn_not_after_a_private_conv_stays():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(2, 2, 1), TDBatchNorm(2)

        def forward(self, x):
            c = self.conv(x)
            return self.bn(c) + c

    g = randomise_stats(snnc.trace(Shared(), torch.zeros(1, 2, 3, 3)))
    f = fold_tdbn(g)
    assert "snn.tdbn" in snnc.dump(f)
    x = torch.randn(1, 2, 3, 3)
    assert torch.equal(f(x), g(x))
