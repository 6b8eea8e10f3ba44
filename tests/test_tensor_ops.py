"""Tensor-level ops between layers (issue 14, item 2): every op record runs in every float target.

Each case is a small per-step SNN written the way a torch user writes a forward (methods,
functions, in-place ``+=``, slicing, Python lists) around snnc LIF neurons. It is traced,
unrolled over T and compiled to torch, onnx and tvm:llvm (hybrid and relax); every target must
give the reference run's numbers (``snnc.run`` of the per-step graph for T steps).
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import snnc
from snnc.ops import LIF
from snnc.passes import unroll_timesteps

T = 3


def _lif():
    return LIF(tau=2.0, v_th=0.5)


class Shapes(nn.Module):
    """unsqueeze/squeeze, repeat/expand, view/reshape, permute/transpose."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 8)
        self.conv = nn.Conv1d(3, 4, 3, padding=1)
        self.lif1, self.lif2 = _lif(), _lif()

    def forward(self, x):                              # x [N, 6]
        y = self.lif1(self.fc(x)).unsqueeze(1)         # [N, 1, 8]
        y = y.repeat(1, 3, 1) + self.fc(x).unsqueeze(-2).expand(-1, 3, -1)   # [N, 3, 8]
        y = self.conv(y)                               # [N, 4, 8]
        y = y.permute(0, 2, 1).reshape(-1, 8, 2, 2)    # [N, 8, 2, 2]
        y = y.transpose(1, 2).contiguous().view(x.shape[0], -1)   # [N, 32]
        z = self.lif2(y).unsqueeze(2).squeeze(2).squeeze()
        return torch.flatten(z, 1)


class Reductions(nn.Module):
    """mean / sum over any dim, as methods and functions, with keepdim."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3)
        self.lif = _lif()

    def forward(self, x):                              # x [N, 2, 10]
        s = self.lif(self.conv(x))                     # [N, 4, 8]
        return torch.cat([s.mean(2), s.sum(-1) * 0.1, torch.mean(s, dim=1),
                          s.mean(dim=(1, 2), keepdim=True).flatten(1), torch.sum(s, 2, keepdim=True)[..., 0]], 1)


class Joins(nn.Module):
    """cat / stack, torch.stack of a Python list built in a loop, getitem slicing."""

    def __init__(self):
        super().__init__()
        self.fcs = nn.ModuleList([nn.Linear(4, 5) for _ in range(3)])
        self.lif = _lif()

    def forward(self, x):                              # x [N, 3, 4]
        outs = []
        for i, fc in enumerate(self.fcs):
            outs.append(fc(x[:, i]))
        y = self.lif(torch.stack(outs, dim=1))         # [N, 3, 5]
        z = torch.stack([y[:, 0], y[:, 2]], 2)         # [N, 5, 2]
        return torch.cat((y[:, :, 1:4].flatten(1), z[..., ::2].flatten(1), y[:, -1]), dim=1)


class Arithmetic(nn.Module):
    """activations as modules, functions and methods; in-place ``+=``, sub, neg."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(5, 6), nn.Linear(5, 6)
        self.acts = nn.ModuleList([nn.GELU(), nn.Sigmoid(), nn.Tanh()])
        self.lif = _lif()

    def forward(self, x):
        a = self.fc1(x)
        a += self.fc2(x)
        b = F.relu(a) - torch.sigmoid(a) + F.gelu(a) * a.tanh() - (-a.sigmoid())
        b = b + torch.tanh(a) - torch.relu(-a) + a.relu() + F.sigmoid(a) - torch.sub(a, 0.5) + F.tanh(a)
        for act in self.acts:
            b = b + act(a)
        return self.lif(b.neg() + 2 * torch.neg(a) + a.sub(1))


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4), _lif(), nn.AvgPool1d(2),
                               nn.Conv1d(4, 4, 3), _lif(), nn.MaxPool1d(2), nn.Dropout(0.3), nn.Identity())
        self.g = nn.Sequential(nn.AdaptiveAvgPool1d(2), nn.Flatten(), nn.Linear(8, 3), _lif())
        self.h = nn.AdaptiveMaxPool1d(1)

    def forward(self, x):                              # x [N, 2, 16]
        y = self.f(x)                                  # [N, 4, 3]
        return torch.cat([self.g(y), self.h(y)[..., 0], F.max_pool1d(y, 3).reshape(shape=(-1, 4))], 1)


class Conv2dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), _lif(),
                               nn.MaxPool2d(2), nn.Dropout2d(0.2), nn.AvgPool2d(2))
        self.a, self.m = nn.AdaptiveAvgPool2d((2, 1)), nn.AdaptiveMaxPool2d(1)

    def forward(self, x):                              # x [N, 2, 8, 8]
        y = self.f(x)
        return torch.cat([self.a(y).flatten(1), self.m(y).flatten(1), F.dropout(y, 0.5, self.training).mean((2, 3))], 1)


class Conv3dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv3d(2, 4, 3, padding=1), nn.BatchNorm3d(4), _lif(), nn.AvgPool3d(2),
                               nn.Conv3d(4, 4, 1), _lif(), nn.MaxPool3d((1, 2, 2)), nn.Dropout3d(0.1))
        self.a, self.m = nn.AdaptiveAvgPool3d(1), nn.AdaptiveMaxPool3d((1, 1, 1))

    def forward(self, x):                              # x [N, 2, 4, 8, 8]
        y = self.f(x)
        return self.a(y).flatten(1) + self.m(y).flatten(1)


CASES = {
    "shapes": (Shapes, (6,)),
    "reductions": (Reductions, (2, 10)),
    "joins": (Joins, (3, 4)),
    "arithmetic": (Arithmetic, (5,)),
    "conv1d": (Conv1dNet, (2, 16)),
    "conv2d": (Conv2dNet, (2, 8, 8)),
    "conv3d": (Conv3dNet, (2, 4, 8, 8)),
}
TARGETS = [("torch", {}), ("onnx", {}), ("tvm:llvm", {"mode": "hybrid"}), ("tvm:llvm", {"mode": "relax"})]


def _randomize(net):
    """Non-trivial BN statistics, weights that make neurons fire some of the time."""
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def _graph(name, batch=2):
    cls, sample = CASES[name]
    net = _randomize(cls())
    g = snnc.trace(net, torch.zeros(batch, *sample))
    x = torch.rand(T, batch, *sample) * 2
    return net, g, x


@pytest.mark.parametrize("name", list(CASES))
def test_trace_matches_the_model_step_by_step(name):
    net, g, x = _graph(name)
    snnc.reset(net)
    with torch.no_grad():
        want = torch.stack([net(x[t]) for t in range(T)])
    ref = snnc.run(g, x, T=T)
    assert torch.equal(ref, want)
    spikes = [m for m in g.modules() if isinstance(m, LIF)]
    assert spikes


@pytest.mark.parametrize("target,opts", TARGETS, ids=["torch", "onnx", "tvm-hybrid", "tvm-relax"])
@pytest.mark.parametrize("name", list(CASES))
def test_every_float_target_matches_the_reference(name, target, opts):
    if target.startswith("tvm"):
        pytest.importorskip("tvm")
    _, g, x = _graph(name)
    ref = snnc.run(g, x, T=T)
    u = unroll_timesteps(g, T=T)
    assert torch.equal(snnc.run(u, x), ref)      # the unrolled graph computes the same numbers
    got = snnc.compile(u, target=target, **opts)(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


class SeqNet(nn.Module):
    """A multi-step forward on ``[T, N, C, L]`` written the spikingjelly way: time merged into the
    batch for the conv (``flatten(0, 1)`` ... ``view(T, N, ...)``), a Python list over ``s[t]``
    stacked back into a sequence, ``.mean(0)`` over time at the end."""

    def __init__(self, T=4):
        super().__init__()
        self.T = T
        self.conv, self.bn = nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.lif1, self.lif2 = LIF(step_mode="m", v_th=0.5), LIF(step_mode="m", v_th=0.5)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        y = self.bn(self.conv(x.flatten(0, 1)))
        s = self.lif1(y.view(x.shape[0], x.shape[1], 4, 16))
        outs = []
        for t in range(self.T):
            outs.append(self.fc(s[t].flatten(1)))
        return self.lif2(torch.stack(outs)).mean(0)


def test_multi_step_forward_gets_time_layouts_and_runs_in_every_target():
    net = _randomize(SeqNet())
    net.fc.weight.data.abs_()
    g = snnc.trace(net, torch.zeros(4, 2, 2, 16))
    lines = {}   # op -> its first line in the dump
    for line in snnc.dump(g).splitlines()[1:-2]:
        lines.setdefault(line.split("=")[1].split("(")[0].strip(), line)
    assert "@flat" in lines["flatten"] and "@flat" in lines["nn.conv1d"]   # time merged into the batch
    assert "@seq" in lines["view"] and "@seq" in lines["stack"]             # split back / stacked steps
    # mean(0): time removed; the tracer reads .mean(0) of a spike sequence as the rate readout
    assert "@" not in lines.get("mean", lines.get("snn.readout", "@")).split("=")[0]
    x = torch.rand(4, 2, 2, 16) * 2
    ref = snnc.run(g, x)
    with torch.no_grad():
        assert torch.equal(ref, net(x))
    assert 0 < ref.mean() < 1
    for target, opts in TARGETS[1:]:
        if target.startswith("tvm") and pytest.importorskip("tvm") is None:
            continue
        torch.testing.assert_close(snnc.compile(g, target=target, **opts)(x), ref, atol=1e-5, rtol=1e-5)


def test_unroll_moves_dims_past_time():
    """Golden IR: ops that name dims run once on [T, N, ...] with their dims shifted, shapes are
    read per step (so ``view(N, ...)`` stays a per-step view), and conv runs on the merged batch."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.lif = nn.Conv1d(2, 4, 3), LIF()

        def forward(self, x):
            s = self.lif(self.conv(x))
            return torch.cat([s.mean(2), s[:, 1:3].flatten(1)], 1).view(x.shape[0], 4, -1)

    u = unroll_timesteps(snnc.trace(Net(), torch.zeros(2, 2, 10)), T=4)
    body = [line.split("=", 1)[1].split("#")[0].strip() for line in snnc.dump(u).splitlines()[1:-2]]
    assert body == [
        "time.merge(%0)",
        "nn.conv1d(%1) {out=4, kernel=3, stride=1, pad=0} (weight=f32[4,2,3], bias=f32[4])",
        "time.split(%2) {T=4}",
        "snn.lif(%3) {tau=2, v_th=1, reset=subtract}",
        "mean(%4, 3)",
        "getitem(%4, (slice(None, None, None), slice(None, None, None), slice(1, 3, None)))",
        "flatten(%6, 2)",
        "cat((%5, %7), 2)",
        "getitem(%0, 0)",
        "getattr(%9, shape)",
        "getitem(%10, 0)",
        "view(%8, 4, %11, 4, -1)",
    ]
    assert "f32[4,2,4,5]@seq = view" in snnc.dump(u)


@pytest.mark.parametrize("name", [n if n == "joins" else pytest.param(n, marks=pytest.mark.slow) for n in CASES])
def test_tvm_cuda_builds(name, tmp_path):
    """No GPU here: the CUDA module must build (nvcc); ``test_tvm.py`` runs it where a GPU is lent."""
    pytest.importorskip("tvm")
    from snnc.targets.tvm import cuda_source
    _, g, _ = _graph(name)
    m = snnc.compile(unroll_timesteps(g, T=T), target="tvm:cuda", arch="sm_80", dump_dir=tmp_path)
    assert "__global__" in cuda_source(m.relax_lib.module)



class _OnSeq(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.lif, self.f = LIF(step_mode="m"), f

    def forward(self, x):           # x [T, N, C, L]
        return self.f(self.lif(x))


@pytest.mark.parametrize("f,layout", [
    (lambda s: s.sum(0), "step"), (lambda s: s[-1], "step"), (lambda s: torch.mean(s, dim=(0, 2)), "step"),
    (lambda s: s.permute(1, 0, 2, 3), "step"), (lambda s: s.flatten(0, 2), "step"),
    (lambda s: s[1:], "seq"), (lambda s: s[:, :, 0], "seq"), (lambda s: s.transpose(2, 3), "seq"),
    (lambda s: s.sum(-1), "seq"), (lambda s: s.unsqueeze(2).squeeze(2), "seq"),
    (lambda s: torch.cat([s, s], 1), "seq"), (lambda s: s.flatten(0, 1), "flat"),
    (lambda s: s.flatten(0, 1).view(3, 2, -1), "seq"), (lambda s: s.reshape(3, 2, -1), "seq"),
], ids=["sum0", "last_step", "mean02", "permute10", "flatten02", "steps1:", "index2", "transpose23",
        "sum-1", "unsqueeze_squeeze", "cat1", "flatten01", "view_back", "reshape"])
def test_what_an_op_does_to_the_time_axis(f, layout):
    g = snnc.trace(_OnSeq(f), torch.zeros(3, 2, 4, 5))
    out = next(n for n in g.graph.nodes if n.op == "output").args[0]
    assert out.meta["snnc"].layout == layout


@pytest.mark.parametrize("name", list(CASES))
def test_unrolled_graph_round_trips_the_graph_file(name, tmp_path):
    _, g, x = _graph(name)
    u = unroll_timesteps(g, T=T)
    snnc.save(u, tmp_path / "g.snnc")
    assert torch.equal(snnc.run(snnc.load_graph(tmp_path / "g.snnc"), x), snnc.run(u, x))
