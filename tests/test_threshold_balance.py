"""threshold_balance: golden IR, rate ~ clipped ReLU at large T, residual adds, channel-wise
normalisation, spiking (Rathi) balancing, QCFS, errors."""
import pytest
import torch
from torch import nn

import snnc
from snnc.errors import InputError, SnncError, UnsupportedOp
from snnc.ops import IF, QCFS, PoissonEncoder
from snnc.passes import fold_bn, threshold_balance, unroll_timesteps
from snnc.passes.threshold_balance import balance

GOLDEN_SNN = """\
graph(%0: f32[2,1,4,4]) {
  %1 : f32[2,1,4,4] = snn.direct_encoder(%0)  # encoder
  %2 : f32[2,2,4,4] = nn.conv2d(%1) {out=2, kernel=3, stride=1, pad=1} (weight=f32[2,1,3,3], bias=f32[2])  # 0
  %3 : spike[2,2,4,4] = snn.if(%2) {v_th=1, reset=subtract}  # 1
  %4 : f32[2,2,2,2] = nn.avg_pool2d(%3) {kernel=2, stride=2, pad=0}  # 2
  %5 : f32[2,8] = nn.flatten(%4) {start_dim=1}  # 3
  %6 : f32[2,4] = nn.linear(%5) {out=4} (weight=f32[4,8], bias=f32[4])  # 4
  %7 : spike[2,4] = snn.if(%6) {v_th=1, reset=subtract}  # 5
  %8 : f32[2,3] = nn.linear(%7) {out=3} (weight=f32[3,4], bias=f32[3])  # 7
  %9 : f32[2,3] = snn.readout(%8) {mode=membrane}  # readout
  return %9
}
"""
GOLDEN_OPTIONS = """\
  %1 : spike[2,1,4,4] = snn.poisson_encoder(%0) {seed=0}  # encoder
  %3 : spike[2,2,4,4] = snn.if(%2) {v_th=1, v_reset=0, reset=zero, v_init=0.5}  # 1
"""


def tiny():
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                         nn.Linear(8, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, 3)).eval()


class Block(nn.Module):
    """stem conv-ReLU, then relu(conv(relu(conv(a))) + a) (identity skip), linear."""

    def __init__(self, c=3):
        super().__init__()
        self.stem, self.c1, self.c2 = nn.Conv2d(1, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c * 16, 4)

    def forward(self, x):
        a = torch.relu(self.stem(x))
        b = torch.relu(self.c2(torch.relu(self.c1(a))) + a)
        return self.fc(b.flatten(1))


def test_golden_ir_and_input_untouched():
    g = snnc.trace(tiny(), torch.zeros(2, 1, 4, 4))
    before = snnc.dump(g)
    assert snnc.dump(threshold_balance(g, torch.rand(16, 1, 4, 4))) == GOLDEN_SNN
    assert snnc.dump(g) == before
    s = threshold_balance(g, torch.rand(16, 1, 4, 4), method="max", reset="zero", encoding="poisson",
                          v_init_fraction=0.5)
    lines = snnc.dump(s).splitlines()
    assert "\n".join([lines[1], lines[3]]) + "\n" == GOLDEN_OPTIONS
    assert not any(isinstance(m, nn.Dropout) for m in s.modules())


def test_two_layer_net_rate_reproduces_ann_at_large_T():
    """Direct input, max balancing on the same data: each hidden IF fires floor(T a / lambda) times
    (reset by subtraction, v_init = 0), so |snn - ann| <= sum_j |W2_ij| lambda_j / T."""
    ann = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    x = torch.rand(32, 6)
    snn, scales = balance(snnc.trace(ann, x[:2]), x, method="max")
    T = 200
    out = snnc.run(unroll_timesteps(snn, T), x)
    lam = next(iter(scales.values()))
    bound = (ann[2].weight.abs().sum(1) * lam).max().item() / T
    err = (out - ann(x).detach()).abs().max().item()
    assert err <= bound + 1e-5
    assert err > 0            # it is a spiking approximation, not the ANN itself
    assert torch.allclose(snnc.run(snn, x, T=T), out, atol=1e-5)   # per-step reference agrees


def test_clipped_relu_when_scale_below_max():
    """With lambda = 99th percentile, activations above lambda saturate at rate 1: the hidden layer
    reproduces min(relu(a), lambda)."""
    ann = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).eval()
    x = torch.randn(64, 4)
    snn, scales = balance(snnc.trace(ann, x[:2]), x, method="percentile", q=50)
    lam = next(iter(scales.values()))
    hidden = torch.clamp(torch.relu(ann[0](x)), max=lam)
    want = ann[2](hidden).detach()
    out = snnc.run(unroll_timesteps(snn, 400), x)
    bound = (ann[2].weight.abs().sum(1) * lam).max().item() / 400
    assert (out - want).abs().max().item() <= bound + 1e-5


def test_residual_add_converges_to_ann_and_uses_threshold_ratio():
    ann = Block().eval()
    x = torch.rand(24, 1, 4, 4)
    snn, scales = balance(snnc.trace(ann, x[:2]), x, method="max")
    ifs = [m for m in snn.modules() if isinstance(m, IF)]
    assert len(ifs) == 3
    # the IF after the add reads the skip's spikes in units of the stem's lambda
    lam = list(scales.values())
    assert ifs[2].v_th == pytest.approx(float(lam[2] / lam[0]), rel=1e-6)
    want = ann(x).detach()
    errs = [(snnc.run(unroll_timesteps(snn, T), x) - want).abs().max().item() for T in (16, 256)]
    assert errs[1] < 0.1 * want.abs().max().item() and errs[1] < errs[0]


def test_shared_relu_module_becomes_one_neuron_layer_per_call():
    class Shared(nn.Module):   # torchvision's BasicBlock calls self.relu twice
        def __init__(self):
            super().__init__()
            self.l1, self.l2, self.l3, self.relu = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 2), nn.ReLU()

        def forward(self, x):
            return self.l3(self.relu(self.l2(self.relu(self.l1(x)))))

    ann = Shared().eval()
    x = torch.rand(30, 4)
    snn = threshold_balance(snnc.trace(ann, x[:2]), x, method="max")
    ifs = [n.target for n in snn.graph.nodes if n.op == "call_module" and isinstance(snn.get_submodule(n.target), IF)]
    assert len(set(ifs)) == 2
    err = (snnc.run(unroll_timesteps(snn, 300), x) - ann(x).detach()).abs().max().item()
    assert err < 0.05 * ann(x).abs().max().item()


def test_channel_wise_normalises_each_channel_to_threshold_one():
    ann = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 2)).eval()
    x = torch.rand(20, 1, 6, 6)
    for cw in (False, True):
        snn = threshold_balance(snnc.trace(ann, x[:2]), x, method="max", channel_wise=cw)
        cur = snn.get_submodule("0")(x)              # the first IF's input current (direct input)
        per = cur.transpose(0, 1).reshape(4, -1).max(1).values
        if cw:   # a channel that never fires (max <= 0) keeps the layer's largest scale
            alive = per > 0
            assert alive.sum() >= 2 and torch.allclose(per[alive], torch.ones(int(alive.sum())), atol=1e-5)
        else:
            assert per.max().item() == pytest.approx(1.0, abs=1e-5) and per.min() < 0.99


def test_mse_and_percentile_scales_below_max():
    g = fold_bn(snnc.trace(tiny(), torch.zeros(2, 1, 4, 4)))
    x = torch.rand(64, 1, 4, 4)
    smax = balance(g, x, method="max")[1]
    for method in ("percentile", "mse"):
        s = balance(g, x, method=method)[1]
        assert all((s[k] <= smax[k] + 1e-6).all() for k in smax)


def test_spiking_balancing_layer_by_layer():
    """Rathi 2020: lambda_l = max input current of layer l in the SNN converted up to l-1. With
    direct input the first layer's current is the ANN pre-activation, so it equals the max scale;
    ``scale`` multiplies every layer (0.7 in the paper)."""
    g = fold_bn(snnc.trace(tiny(), torch.zeros(2, 1, 4, 4)))
    x = torch.rand(32, 1, 4, 4)
    smax = balance(g, x, method="max")[1]
    s1 = balance(g, x, method="spiking", T_calib=8)[1]
    s07 = balance(g, x, method="spiking", T_calib=8, scale=0.7)[1]
    first = next(iter(smax))
    assert float(s1[first]) == pytest.approx(float(smax[first]), rel=1e-6)
    assert float(s07[first]) == pytest.approx(0.7 * float(smax[first]), rel=1e-6)
    sp = balance(g, x, method="spiking", T_calib=8, encoding="poisson", channel_wise=True)
    assert isinstance(sp[0].get_submodule("encoder"), PoissonEncoder)
    assert all(v.shape in ((2, 1, 1), (4,)) for v in sp[1].values())


def test_qcfs_net_is_exact_at_T_equal_L():
    """A QCFS hidden layer with direct input and v_init = v_th / 2 spikes exactly
    clamp(floor(a L / lambda + 1/2), 0, L) times in L steps (Bu 2022), so the SNN equals the ANN."""
    L = 4
    ann = nn.Sequential(nn.Linear(5, 7), QCFS(L=L, threshold=1.5), nn.Linear(7, 3)).eval()
    x = torch.randn(40, 5)
    snn = threshold_balance(snnc.trace(ann, x[:2]), method="qcfs")
    assert "v_init=0.5" in snnc.dump(snn)
    assert torch.allclose(snnc.run(unroll_timesteps(snn, L), x), ann(x).detach(), atol=1e-5)


@pytest.mark.parametrize("calib, match", [
    (torch.full((4, 1, 4, 4), float("nan")), "batch 0 contains 64 NaN/inf"),
    ([torch.rand(2, 1, 4, 4), torch.tensor([[[[float("inf")] * 4] * 4]])], "batch 1 contains 16 NaN/inf"),
    (torch.zeros(0, 1, 4, 4), "empty"),
    ([], "empty"),
    (torch.rand(3, 1, 5, 5), r"shape \[3, 1, 5, 5\] does not match the graph's input \[N, 1, 4, 4\]"),
    (None, "calib is None"),
])
def test_bad_calibration_data(calib, match):
    g = snnc.trace(tiny(), torch.zeros(2, 1, 4, 4))
    with pytest.raises(InputError, match=match):
        threshold_balance(g, calib)


def test_unsupported_graphs_are_clear_errors():
    x = torch.rand(8, 1, 4, 4)
    bn = snnc.trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()).eval(), x[:2])
    with pytest.raises(SnncError, match=r"node %_1 .* is a BatchNorm; run fold_bn first"):
        threshold_balance(bn, x)
    mp = snnc.trace(nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                                  nn.Linear(8, 2)).eval(), x[:2])
    with pytest.raises(UnsupportedOp, match=r"node %_2 .* is a max pooling .* max_pool='refuse'.*'lateral'"):
        threshold_balance(mp, x, max_pool="refuse")
    with pytest.raises(InputError, match="max_pool='avg'"):
        threshold_balance(mp, x, max_pool="avg")
    s = threshold_balance(mp, x, max_pool="spikes")
    assert snnc.run(s, x, T=4).shape == (8, 2)
    with pytest.raises(InputError, match="method='median'"):
        threshold_balance(snnc.trace(tiny(), x[:2]), x, method="median")
    with pytest.raises(SnncError, match="method='qcfs' needs every activation"):
        threshold_balance(snnc.trace(tiny(), x[:2]), x, method="qcfs")
    snn = threshold_balance(snnc.trace(tiny(), x[:2]), x)
    with pytest.raises(SnncError, match="already a spiking op"):
        threshold_balance(snn, x)


def test_bias_correction_matches_mean_currents_to_the_ann():
    """Li 2021: after correction, each IF's mean input current over T_target steps (per channel,
    on the calibration data) equals the ANN's mean pre-activation in the IF's units."""
    torch.manual_seed(1)
    ann = nn.Sequential(nn.Linear(5, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 3)).eval()
    x = torch.rand(64, 5)
    T = 3

    def gaps(bc):
        snn, scales = balance(snnc.trace(ann, x[:2]), x, method="max", T_target=T, bias_correction=bc)
        seen = {}
        hooks = [snn.get_submodule(n).register_forward_hook(
            lambda m, a, o, n=n: seen.setdefault(n, []).append(a[0].mean(0))) for n in ("1", "3")]
        snnc.run(snn, x, T=T)
        for h in hooks:
            h.remove()
        pre = {"1": ann[0](x), "3": ann[2](torch.relu(ann[0](x)))}
        return [(torch.stack(seen[n]).mean(0) - pre[n].mean(0) / scales[f"_{n}"]).abs().max().item()
                for n in ("1", "3")]

    assert max(gaps(True)) < 1e-4
    assert gaps(False)[1] > 1e-3


def _if_spikes(rates, T):
    """Spike trains [T, ...] of IF neurons (v_th 1, reset by subtraction) driven by constant ``rates``."""
    v, out = torch.zeros_like(rates), []
    for _ in range(T):
        v = v + rates
        s = (v >= 1).float()
        v = v - s
        out.append(s)
    return torch.stack(out)


def test_spike_max_pool_lateral_counts_equal_max_of_counts_and_gate_is_close():
    """LIPooling (Li 2022): the output's spike count after every step t equals the max over each
    window of the inputs' counts; the per-step max of spikes (an OR) over-counts; the gate
    (Rueckauer 2017) is closer to the max than the OR is."""
    from snnc.ops import SpikeMaxPool2d
    torch.manual_seed(0)
    spikes = _if_spikes(torch.rand(3, 2, 6, 6), 40)
    want = torch.nn.functional.max_pool2d(spikes.cumsum(0).flatten(0, 1), 2).unflatten(0, (40, 3))
    lateral = SpikeMaxPool2d(2, mode="lateral", step_mode="m")(spikes)
    assert set(lateral.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(lateral.cumsum(0), want)
    per_step = SpikeMaxPool2d(2, mode="lateral")                     # single-step form: the same
    assert torch.equal(torch.stack([per_step(s) for s in spikes]), lateral)
    gate = SpikeMaxPool2d(2, mode="gate", step_mode="m")(spikes).sum(0)
    union = torch.nn.functional.max_pool2d(spikes.flatten(0, 1), 2).unflatten(0, (40, 3)).sum(0)
    assert (union >= want[-1]).all() and (union > want[-1]).any()
    assert (want[-1] - gate).abs().sum() < (union - want[-1]).abs().sum()


def test_max_pool_net_error_falls_with_T_only_with_running_sum_pooling():
    """conv-ReLU-MaxPool x2: with lateral pooling the SNN's error to the ANN falls as T grows; with
    the per-step max of spikes it does not (the issue's 'accuracy falls as T grows')."""
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(32, 1, 8, 8)
    want = ann(x).detach()
    g = snnc.trace(ann, x[:2])
    errs = {}
    for mode in ("lateral", "spikes"):
        snn = threshold_balance(g, x, method="max", max_pool=mode)
        errs[mode] = [(snnc.run(unroll_timesteps(snn, T), x) - want).abs().mean().item() for T in (8, 64, 256)]
    assert errs["lateral"][0] > errs["lateral"][1] > errs["lateral"][2] and errs["lateral"][2] < 0.05 * want.abs().mean()
    assert errs["spikes"][2] > 5 * errs["lateral"][2]
    assert "snn.max_pool2d" in snnc.dump(threshold_balance(g, x))   # the default


def test_channel_wise_half_threshold_on_identity_skip_uses_per_channel_v_init():
    """An identity skip with channel-wise scales needs a per-channel threshold after the add; the
    half-threshold start (v_init_fraction=0.5) then is a per-channel v_init = v_th / 2."""
    torch.manual_seed(1)   # every channel alive in calibration (a dead one takes the layer's max)
    ann = Block().eval()
    x = torch.rand(24, 1, 4, 4)
    g = snnc.trace(ann, x[:2])
    snn = threshold_balance(g, x, method="max", channel_wise=True, v_init_fraction=0.5)
    ifs = [snn.get_submodule(n.target) for n in snn.graph.nodes if n.op == "call_module"
           and isinstance(snn.get_submodule(n.target), IF)]
    after_add = ifs[2]
    assert isinstance(after_add.v_th, torch.Tensor) and after_add.v_th.shape == (3, 1, 1)
    assert torch.allclose(after_add.v_init, 0.5 * after_add.v_th)
    want = ann(x).detach()
    errs = [(snnc.run(unroll_timesteps(snn, T), x) - want).abs().max().item() for T in (16, 256)]
    assert errs[1] < 0.1 * want.abs().max().item() and errs[1] < errs[0]
    # the per-step reference, the multi-step graph and onnxruntime agree
    u = unroll_timesteps(snn, 8)
    assert torch.allclose(snnc.run(snn, x, T=8), snnc.run(u, x), atol=1e-5)
    pytest.importorskip("onnxruntime")
    assert torch.allclose(snnc.compile(u, target="onnx")(x), snnc.run(u, x), atol=1e-4)


def _max_pool_snn(mode, T=5):
    torch.manual_seed(0)
    ann = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, 1), nn.Conv2d(4, 4, 3, padding=1),
                        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 3)).eval()
    x = torch.rand(16, 1, 8, 8)
    return unroll_timesteps(threshold_balance(snnc.trace(ann, x[:2]), x, method="max", max_pool=mode), T), x


@pytest.mark.parametrize("mode", ["lateral", "gate"])
def test_spike_max_pool_runs_on_onnx(mode):
    pytest.importorskip("onnxruntime")
    g, x = _max_pool_snn(mode)
    # the pooled spikes are identical; the readout Linear after them may round one ulp apart
    # (onnxruntime's GEMM sums in another order than torch's on some AVX-512 hosts)
    torch.testing.assert_close(snnc.compile(g, target="onnx")(x), snnc.run(g, x), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_spike_max_pool_runs_on_tvm_llvm():
    pytest.importorskip("tvm")
    g, x = _max_pool_snn("lateral")
    x = x[:2]   # the relax build has the traced batch
    for mode in ("hybrid", "relax"):
        assert torch.allclose(snnc.compile(g, target="tvm:llvm", mode=mode)(x), snnc.run(g, x), atol=1e-5)
    gate = _max_pool_snn("gate")[0]   # hybrid: pooling runs in torch beside the TVM neuron kernels
    assert torch.allclose(snnc.compile(gate, target="tvm:llvm")(x), snnc.run(gate, x), atol=1e-5)
    with pytest.raises(UnsupportedOp, match="mode='gate' has no TVM lowering"):
        snnc.compile(gate, target="tvm:llvm", mode="relax")
