"""unroll_timesteps: golden IR, and outputs bit-equal to the per-step reference."""
import torch
from torch import nn

import snnc
from snnc.ops import IF, LIF, DirectEncoder, PoissonEncoder, Readout
from snnc.passes import unroll_timesteps
from snnc.zoo import bench_net, digits_snn

GOLDEN = """\
graph(%0: f32[2,4]) T=3 {
  %1 : f32[2,3] = nn.linear(%0) {out=3} (weight=f32[3,4], bias=f32[3])  # 1
  %2 : f32[3,2,3]@seq = snn.direct_encoder(%1) {T=3}  # encoder_1
  %3 : spike[3,2,3]@seq = snn.lif(%2) {tau=2, v_th=1, reset=subtract}  # 2
  %4 : f32[3,2,2]@seq = nn.linear(%3) {out=2} (weight=f32[2,3], bias=f32[2])  # 3
  %5 : f32[2,2] = snn.readout(%4) {mode=membrane}  # 4
  return %5
}
"""


def test_golden_ir_encoder_hoisted():
    g = snnc.trace(nn.Sequential(DirectEncoder(), nn.Linear(4, 3), LIF(tau=2.0), nn.Linear(3, 2), Readout()),
                   torch.zeros(2, 4))
    assert snnc.dump(unroll_timesteps(g, T=3)) == GOLDEN


def test_conv_snn_equals_per_step_reference_exactly():
    g = snnc.trace(digits_snn(8).eval(), torch.zeros(4, 1, 8, 8))  # eval: BN uses running stats
    u = unroll_timesteps(g, T=6)
    for seed in range(5):
        x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(snnc.run(u, x), snnc.run(g, x, T=6))
    assert torch.equal(snnc.run(unroll_timesteps(g, T=6, hoist_encoder=False), x), snnc.run(g, x, T=6))


def test_sequence_input_graph_equals_reference_and_merges_time():
    g = snnc.trace(bench_net((2, 4, 4)), torch.zeros(3, 2, 8, 8))
    u = unroll_timesteps(g, T=5)
    assert u.snnc_spec["inputs"][0][0] == (5, 3, 2, 8, 8) and u.snnc_spec["layout"] == "seq"
    ops = [snnc.ir.op_name(u, n) for n in u.graph.nodes]
    assert ops.count("time.merge") == 2 and ops.count("time.split") == 2
    x = torch.rand(5, 3, 2, 8, 8) * 2
    assert torch.equal(snnc.run(u, x), snnc.run(g, x, T=5))


def test_residual_and_poisson():
    class Res(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.c1, self.n1 = PoissonEncoder(seed=2), nn.Conv2d(1, 4, 3, padding=1), IF()
            self.c2, self.n2, self.out = nn.Conv2d(4, 4, 3, padding=1), IF(), Readout("spike_count")

        def forward(self, x):
            a = self.n1(self.c1(self.enc(x)))
            return self.out(self.n2(self.c2(a) + a))

    g = snnc.trace(Res(), torch.zeros(2, 1, 6, 6))
    u = unroll_timesteps(g, T=4)
    x = torch.rand(2, 1, 6, 6)
    assert torch.equal(snnc.run(u, x), snnc.run(g, x, T=4))


def test_unrolled_graph_trains_and_saves(tmp_path):
    g = unroll_timesteps(snnc.trace(bench_net((2, 4)), torch.zeros(1, 2, 4, 4)), T=2)
    out = g(torch.rand(2, 1, 2, 4, 4))
    assert out.shape == (2, 1, 4, 4, 4)
    torch.save(g, tmp_path / "u.pt")
    g2 = torch.load(tmp_path / "u.pt", weights_only=False)
    x = torch.rand(2, 1, 2, 4, 4)
    assert torch.equal(g2(x), g(x))


def test_get_attr_constant_is_not_broadcast_over_time():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lif = nn.Conv2d(1, 3, 3, padding=1), LIF(tau=2.0)
            self.register_buffer("gain", torch.tensor([0.5, 1.0, 2.0]).view(1, 3, 1, 1))

        def forward(self, x):
            return self.lif(self.conv(x) * self.gain)

    g = snnc.trace(Scaled(), torch.zeros(2, 1, 5, 5))
    u = unroll_timesteps(g, T=3)
    assert snnc.ir.info(next(n for n in u.graph.nodes if n.op == "get_attr")).shape == (1, 3, 1, 1)
    x = torch.rand(3, 2, 1, 5, 5) * 3
    assert torch.equal(snnc.run(u, x), snnc.run(g, x, T=3))
