"""The code-free graph format: every op round-trips (save -> load -> equal outputs, equal dump),
and a graph file cannot name anything outside the IR's allowlist."""
import json
import pickle

import pytest
import torch
from torch import nn

import snnc
from snnc.errors import FileFormatError, SnncError
from snnc.fileio import bundle_bytes, read_bundle
from snnc.passes import fold_tdbn, insert_surrogate, quantize_integer, unroll_timesteps
from snnc.zoo import bench_net, cifarnet, digits_cnn, digits_resnet, digits_snn, preact_resnet18, resnet19, vgg11, vgg16

from int_nets import ann, convert_by_max


pytestmark = pytest.mark.usefixtures("one_thread")


def _roundtrip(g, tmp_path, x):
    path = tmp_path / "g.snnc"
    snnc.save(g, path)
    g2 = snnc.load_graph(path)
    assert snnc.dump(g2) == snnc.dump(g)
    torch.manual_seed(1)
    want = snnc.run(g, [x])
    torch.manual_seed(1)
    got = snnc.run(g2, [x])
    assert torch.equal(got, want)
    return g2


ZOO = {
    "digits_cnn": (lambda: digits_cnn(width=4), (2, 1, 8, 8), None),
    "digits_snn": (lambda: digits_snn(width=4), (2, 1, 8, 8), 3),
    "digits_resnet": (lambda: digits_resnet(width=4), (2, 1, 8, 8), None),
    "bench_net": (lambda: bench_net(channels=(3, 4, 4, 4)), (2, 3, 8, 8), 2),
    "cifarnet_neunorm_voting": (lambda: cifarnet(width=1 / 32, image_size=8, neunorm=True), (2, 3, 8, 8), 2),
    "resnet19_tdbn": (lambda: resnet19(width=1 / 32), (2, 3, 8, 8), 2),
    "vgg11": (lambda: vgg11(width=1 / 64), (2, 3, 32, 32), 2),
    "vgg16_poisson": (lambda: vgg16(width=1 / 64, poisson=True), (2, 3, 32, 32), 2),
    "preact_resnet18_dsr": (lambda: preact_resnet18(width=1 / 16), (2, 3, 8, 8), 2),
    "preact_resnet18_dsr_lif": (lambda: preact_resnet18(width=1 / 16, neuron="lif", alpha=1.0), (2, 3, 8, 8), 2),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_roundtrip(name, tmp_path):
    make, shape, T = ZOO[name]
    torch.manual_seed(0)
    x = torch.rand(shape)
    g = snnc.trace(make().eval(), x)
    if T is not None:
        g = unroll_timesteps(g, T=T)
    shape = g.snnc_spec["inputs"][0][0]
    _roundtrip(g, tmp_path, torch.rand(shape))


def test_alif_multi_state_neuron_roundtrip(tmp_path):
    from snnc.ops import ALIF
    torch.manual_seed(0)
    x = torch.rand(2, 6) * 3
    g = unroll_timesteps(snnc.trace(nn.Sequential(nn.Linear(6, 5), ALIF(tau=2.0, rho=0.8, beta=0.3)), x), T=4)
    _roundtrip(g, tmp_path, torch.rand(4, 2, 6) * 3)


class _TensorOps(nn.Module):
    """Tensor-level ops with dims, slices and keyword arguments in the graph's args."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        from snnc.ops import LIF
        self.lif = LIF(tau=2.0)

    def forward(self, x):
        y = self.lif(self.fc(x[:, 1:, ...].permute(0, 2, 1)))
        return torch.sigmoid(y.mean(dim=1)) - y.sum(1).reshape(shape=(y.shape[0], -1))


def test_tensor_ops_roundtrip(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 5, 6)
    _roundtrip(snnc.trace(_TensorOps().eval(), x), tmp_path, x)


def test_surrogates_by_name_and_training_flags(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    g = insert_surrogate(unroll_timesteps(snnc.trace(digits_snn(width=4), x), T=2), kind="sigmoid", alpha=3.0)
    g2 = _roundtrip(g, tmp_path, x)
    kinds = [(m.surrogate.kind, m.surrogate.params) for m in g2.modules() if hasattr(m, "surrogate")]
    assert kinds and all(k == ("sigmoid", {"alpha": 3.0}) for k in kinds)
    # still trainable: gradients reach the loaded parameters
    g2.train()
    g2(x).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in g2.parameters())


def test_tensor_thresholds_qcfs_and_folded_tdbn(tmp_path):
    from snnc.ops import LIF, use_qcfs
    torch.manual_seed(0)
    x = torch.rand(2, 1, 8, 8)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), LIF(tau=2.0, v_th=torch.tensor([0.5, 1.0, 1.5]).view(3, 1, 1)), nn.Flatten(),
                        nn.Linear(108, 4))
    g = snnc.trace(net, x)
    g2 = _roundtrip(g, tmp_path, x)
    th = [m.v_th for m in g2.modules() if isinstance(m, LIF)][0]
    assert isinstance(th, torch.Tensor) and th.flatten().tolist() == [0.5, 1.0, 1.5]
    q = snnc.trace(use_qcfs(digits_cnn(width=4, bn=False), L=4).eval(), x)
    _roundtrip(q, tmp_path / "q", x)
    g = unroll_timesteps(snnc.trace(resnet19(width=1 / 32).eval(), torch.rand(2, 3, 8, 8)), T=2)
    _roundtrip(fold_tdbn(g), tmp_path / "f", torch.rand(2, 3, 8, 8))


def test_integer_graph_roundtrip(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(16, 1, 8, 8)
    g = unroll_timesteps(snnc.trace(convert_by_max(ann(width=4).eval(), x), x[:2]), T=3)
    qg = quantize_integer(g, weight_bits=8)
    xq = torch.randint(-100, 100, (2, 1, 8, 8), dtype=torch.int8)
    g2 = _roundtrip(qg, tmp_path, xq)
    assert g2.snnc_integer == qg.snnc_integer


def _rewrite_graph(path, edit):
    meta, files = read_bundle(path)
    graph = json.loads(files["graph.json"])
    edit(graph)
    files["graph.json"] = json.dumps(graph).encode()
    meta.pop("files")
    path.write_bytes(bundle_bytes(meta, files))


@pytest.fixture
def saved(tmp_path):
    g = snnc.trace(digits_cnn(width=4).eval(), torch.rand(2, 1, 8, 8))
    path = tmp_path / "g.snnc"
    snnc.save(g, path)
    return path


@pytest.mark.parametrize("edit, match", [
    (lambda g: g["modules"].__setitem__(next(iter(g["modules"])), {**next(iter(g["modules"].values())),
                                                                      "class": "os.system"}), "not an op snnc knows"),
    (lambda g: g["nodes"][2].update(op="call_function", target="builtins.eval"), "not an op snnc knows"),
    (lambda g: g["nodes"][2].update(op="call_method", target="__reduce__"), "not an op snnc knows"),
    (lambda g: g["nodes"][2].update(target="a;import os"), "not an op snnc knows"),
    (lambda g: g["nodes"][2].update(name="x = 1; y"), "malformed"),
    (lambda g: g.update(version=99), "version 99"),
    (lambda g: g["nodes"][2].update(args={"pickle": "x"}), "malformed or unknown value"),
    (lambda g: g.pop("spec"), "no valid 'spec'"),
])
def test_crafted_graph_json_is_refused(saved, edit, match):
    _rewrite_graph(saved, edit)
    with pytest.raises(FileFormatError, match=match):
        snnc.load_graph(saved)


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_malicious_pickles_run_nothing(tmp_path):
    marker = tmp_path / "marker"
    old = tmp_path / "old.pt"  # the pre-2 graph format: a torch.save'd pickle
    torch.save({"format": "snnc-graph", "module": _Payload(marker)}, old)
    with pytest.raises(FileFormatError, match="trust=True"):
        snnc.load_graph(old)
    # a pickle smuggled in as tensors.pt of a valid bundle
    g = snnc.trace(digits_cnn(width=4).eval(), torch.rand(2, 1, 8, 8))
    snnc.save(g, tmp_path / "g.snnc")
    meta, files = read_bundle(tmp_path / "g.snnc")
    import io
    buf = io.BytesIO()
    torch.save({"w": _Payload(marker)}, buf)
    files["tensors.pt"] = buf.getvalue()
    meta.pop("files")
    (tmp_path / "evil.snnc").write_bytes(bundle_bytes(meta, files))
    with pytest.raises(FileFormatError, match="not a plain tensor file"):
        snnc.load_graph(tmp_path / "evil.snnc")
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(FileFormatError):
        snnc.load_graph(raw)
    assert not marker.exists()


def test_old_format_loads_only_when_trusted(tmp_path):
    g = snnc.trace(digits_cnn(width=4).eval(), torch.rand(2, 1, 8, 8))
    old = tmp_path / "old.pt"
    torch.save({"format": "snnc-graph", "version": 1, "module": g, "spec": g.snnc_spec}, old)
    with pytest.raises(FileFormatError, match="trust=True"):
        snnc.load_graph(old)
    with pytest.warns(UserWarning, match="can run code"):
        g2 = snnc.load_graph(old, trust=True)
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(g2(x), g(x))


def test_unsaveable_values_name_the_node(tmp_path):
    from snnc.ops import LIF
    g = snnc.trace(nn.Sequential(nn.Linear(4, 4), LIF(tau=2.0)), torch.rand(2, 4))
    next(m for m in g.modules() if isinstance(m, LIF)).hook = lambda x: x
    with pytest.raises(SnncError, match=r"node %_1 .*cannot save a value of type function"):
        snnc.save(g, tmp_path / "g.snnc")
    assert not (tmp_path / "g.snnc").exists()
