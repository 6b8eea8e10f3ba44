"""Channel-wise conversion's per-channel start membrane (v_init = v_init_fraction * v_th per
channel, on the IF after an identity skip) lowered to TVM: the hybrid and relax builds agree with
the torch reference; the fused scan kernel reads the start membranes from the threshold buffer."""
import os
import sys

import pytest
import torch

import snnc
from snnc.ops import IF
from snnc.passes import threshold_balance, unroll_timesteps

sys.path.insert(0, os.path.dirname(__file__))
from test_threshold_balance import Block  # noqa: E402  (conv net with an identity skip)


def _snn(T=6):
    torch.manual_seed(1)
    ann = Block().eval()
    x = torch.rand(24, 1, 4, 4)
    snn = threshold_balance(snnc.trace(ann, x[:2]), x, method="max", channel_wise=True, v_init_fraction=0.5)
    return unroll_timesteps(snn, T), x[:2]


def test_per_channel_v_init_is_in_the_graph():
    g, _ = _snn()
    per_channel = [m for m in g.modules() if isinstance(m, IF) and isinstance(m.v_init, torch.Tensor)]
    assert per_channel and all(m.v_init.shape == (3, 1, 1) for m in per_channel)
    # the start membranes differ per channel (else a scalar would do and the test would prove nothing)
    assert any(len(set(m.v_init.flatten().tolist())) > 1 for m in per_channel)


@pytest.mark.parametrize("mode", ["hybrid", pytest.param("relax", marks=pytest.mark.slow)])
def test_per_channel_v_init_lowers_to_tvm_llvm(mode):
    pytest.importorskip("tvm")
    g, x = _snn()
    want = snnc.run(g, x)
    got = snnc.compile(g, target="tvm:llvm", mode=mode)(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    # v_init matters: starting every membrane at 0 changes the output
    for m in g.modules():
        if isinstance(m, IF) and isinstance(m.v_init, torch.Tensor):
            m.v_init.zero_()
    assert not torch.allclose(snnc.run(g, x), want, atol=1e-3)


def test_scan_kernel_reads_v_init_after_the_thresholds():
    """The fused kernel alone: per-channel thresholds and start membranes from one buffer."""
    tvm = pytest.importorskip("tvm")
    import numpy as np
    from targets.tvm_kernels import NeuronScan, neuron_scan_kernel
    Tn, C, inner, N = 5, 3, 4, 2
    M = N * C * inner
    p = NeuronScan(lambda v, x: v + x, v_th="buffer", threshold_size=C, threshold_inner=inner, v_init="buffer")
    lib = tvm.compile(tvm.IRModule({"main": neuron_scan_kernel(Tn, M, "float32", p)}), target="llvm")
    torch.manual_seed(0)
    x = torch.rand(Tn, M) * 0.6
    th = torch.tensor([0.5, 1.0, 2.0])
    v0 = torch.tensor([0.25, 0.9, 0.0])
    s = tvm.runtime.tensor(np.zeros((Tn, M), "float32"))
    lib["main"](tvm.runtime.tensor(x.numpy()), tvm.runtime.tensor(torch.cat([th, v0]).numpy()), s)
    ch = (torch.arange(M) // inner) % C
    v, want = v0[ch].clone(), []
    for t in range(Tn):
        h = v + x[t]
        spk = (h >= th[ch]).float()
        want.append(spk)
        v = h - spk * th[ch]
    assert torch.equal(torch.from_numpy(s.numpy()), torch.stack(want))
