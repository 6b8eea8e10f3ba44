"""The exported tvm:llvm library: fast convolutions inside TVM, any batch size, tuning.

The standalone Relax library is what ``export`` writes and ``snnc.load`` runs without torch or
the model; these tests check its numbers against the reference (and spikingjelly's own run) at
batch sizes other than the traced one, the conv schedule it uses, and the tuning database.
"""
import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import snnc
from snnc.cli import main
from snnc.errors import SnncError
from snnc.ops import LIF
from snnc.passes import unroll_timesteps
from snnc.zoo import digits_snn


def _agree(got, want, spikes=True):
    assert got.shape == want.shape
    if spikes:  # 0/1 outputs: a threshold-straddling membrane may flip a spike in another sum order
        assert (got == want).float().mean().item() >= 0.999
    else:
        assert (got - want).abs().max().item() <= 1e-4


def _conv_lif_net(channels=(3, 32, 32), seed=0):
    """The bench net's shape, smaller: 3x3 conv + LIF layers; weights scaled so every layer fires."""
    torch.manual_seed(seed)
    layers = []
    for cin, cout in zip(channels[:-1], channels[1:]):
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        with torch.no_grad():
            conv.weight.mul_(3.0)
        layers += [conv, LIF(tau=2.0)]
    return nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def conv_net():
    net = _conv_lif_net()
    x = torch.randn(4, 2, 3, 16, 16) * 2
    g = unroll_timesteps(snnc.trace(net, x[0]), T=4)
    return {"net": net, "g": g, "m": snnc.compile(g, target="tvm:llvm", mode="relax"),
            "ref": snnc.compile(g, target="torch")}


def test_relax_library_takes_any_batch(conv_net):
    m, ref = conv_net["m"], conv_net["ref"]
    assert m.meta["library_batch"] == "any"
    for n in (1, 2, 5, 16):
        x = torch.randn(4, n, 3, 16, 16) * 2
        out = m(x)
        want = ref(x)
        assert want.mean() > 0.02  # the last layer fires
        _agree(out, want)


def test_exported_library_runs_any_batch_without_the_model(conv_net, tmp_path):
    path = conv_net["m"].export(tmp_path / "net.so")
    x = torch.randn(4, 7, 3, 16, 16) * 2
    torch.save(x, tmp_path / "x.pt")
    script = (f"import torch, snnc; m = snnc.load({str(path)!r}); "
              f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)  # no model code there
    _agree(torch.load(tmp_path / "y.pt"), conv_net["ref"](x))


def test_static_library_runs_other_batches_in_chunks(conv_net):
    m = snnc.compile(conv_net["g"], target="tvm:llvm", mode="relax", batch="static")
    assert m.meta["library_batch"] == "static"
    for n in (1, 2, 3, 5):  # traced batch 2: chunks of 2, the last one padded
        x = torch.randn(4, n, 3, 16, 16) * 2
        _agree(m(x), conv_net["ref"](x))
    with pytest.raises(SnncError, match="batch='dynamic'"):
        snnc.compile(conv_net["g"], target="tvm:llvm", mode="relax", batch="dynamic")


def test_spikingjelly_tutorial_net_exported_library_matches_spikingjelly(tmp_path):
    """spikingjelly's conv tutorial style (SeqToANNContainer conv+BN, multi-step LIF, flatten +
    linear head), traced at batch 2 and run by the loaded library at batch 6."""
    sj = pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import functional, layer, neuron
    torch.manual_seed(0)
    net = nn.Sequential(
        layer.SeqToANNContainer(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)),
        neuron.LIFNode(tau=2.0, detach_reset=True, step_mode="m"),
        layer.SeqToANNContainer(nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)),
        neuron.LIFNode(tau=2.0, detach_reset=True, step_mode="m"),
        layer.SeqToANNContainer(nn.Flatten(), nn.Linear(16 * 8 * 8, 10)),
        neuron.LIFNode(tau=2.0, step_mode="m"))
    with torch.no_grad():
        for mod in net.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.mul_(4.0)
            if isinstance(mod, nn.Linear):
                mod.bias.fill_(1.0)
    net.eval()
    g = snnc.trace(net, torch.rand(4, 2, 1, 8, 8))
    m = snnc.compile(g, target="tvm:llvm", mode="relax")
    assert m.meta["library_batch"] == "any"
    loaded = snnc.load(m.export(tmp_path / "sj.so"))
    x = torch.rand(4, 6, 1, 8, 8) * 2
    functional.reset_net(net)
    with torch.no_grad():
        want = net(x)
    assert want.mean() > 0.02
    _agree(loaded(x), want)
    assert sj is not None


def test_cli_compile_tvm_llvm_then_run_digits_with_the_default_batch(tmp_path, capsys):
    torch.manual_seed(0)
    model = digits_snn(4).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3)
    torch.save(model, tmp_path / "snn.pt")
    assert main(["compile", str(tmp_path / "snn.pt"), "--trust-model-file", "--input-shape", "1,1,8,8", "--T", "4",
                 "--target", "tvm:llvm", "-o", str(tmp_path / "net.so")]) == 0
    capsys.readouterr()
    assert snnc.load(tmp_path / "net.so").meta["library_batch"] == "any"
    # the default --batch-size (256) on 300 samples: one full batch and one of 44
    assert main(["run", str(tmp_path / "net.so"), "--data", "digits", "--limit", "300", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    x, y = snnc.data.digits().x_test[:300], snnc.data.digits().y_test[:300]
    want = snnc.run(snnc.trace(model, x[:1]), x, T=4).argmax(-1)
    assert res["samples"] == 300 and res["accuracy"] == pytest.approx(100.0 * (want == y).float().mean().item())


def test_conv_schedule_vectorises_out_channels_and_is_exact():
    """Golden structure + numbers of the oc-vectorised conv: weights repacked with 16 out-channels
    innermost, a [x][16] accumulator tile, parallel rows; 3-channel first layers keep the
    width-vectorised tile."""
    import tvm
    from torch import fx
    from tvm import relax
    from tvm.relax.frontend.torch import from_fx

    from snnc.targets import tvm_build as tb
    from snnc.targets.tvm_schedule import schedule_conv2d

    def fused(conv, shape):
        mod = from_fx(fx.symbolic_trace(nn.Sequential(conv)), [(shape, "float32")])
        mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                        relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
        return [f for gv, f in mod.functions.items() if "conv2d" in gv.name_hint][0]

    torch.manual_seed(0)
    for cin, cout, oc_vectorised in ((32, 32, True), (3, 16, False)):
        conv = nn.Conv2d(cin, cout, 3, padding=1)
        x = (torch.rand(4, cin, 12, 12) < 0.3).float()
        func = schedule_conv2d(fused(conv, (4, cin, 12, 12)))
        text = func.script()
        assert ("param_0_global" in text) == oc_vectorised
        assert "T.parallel" in text and "T.vectorized" in text
        if oc_vectorised:
            assert "T.sblock_alloc_buffer((T.int64(2), T.int64(32), T.int64(3), T.int64(3), T.int64(16)))" in text
        f = tb.build_kernels({"conv": func}, tb.llvm_target("host"))["conv"]
        out = torch.empty(4, cout, 12, 12)
        f(x, conv.weight.detach(), conv.bias.detach().reshape(1, -1, 1, 1), out)
        with torch.no_grad():
            assert (out - conv(x)).abs().max().item() < 1e-5


def test_every_kernel_keeps_its_no_alias_promise():
    """A kernel with the legacy ``tir.noalias`` key is renamed to ``tirx.noalias`` before the
    build (one such kernel made LLVM spill every conv accumulator of the library)."""
    import tvm
    from tvm.script import tirx as T

    from snnc.targets.tvm_build import _noalias

    @T.prim_func(s_tir=True)
    def k(X: T.Buffer((16,), "float32"), Y: T.Buffer((16,), "float32")):
        T.func_attr({"tir.noalias": True})
        with T.sblock("root"):
            for i in range(16):
                Y[i] = X[i] + T.float32(1)
    mod = _noalias(tvm.IRModule({"k": k}))
    assert "tir.noalias" not in mod["k"].attrs and bool(mod["k"].attrs["tirx.noalias"])


def test_cuda_library_builds_with_a_symbolic_batch():
    net = _conv_lif_net((2, 16))
    g = unroll_timesteps(snnc.trace(net, torch.zeros(2, 2, 8, 8)), T=2)
    m = snnc.compile(g, target="tvm:cuda", cache=False)
    assert m.meta["library_batch"] == "any"


def test_tuning_arguments_are_checked(conv_net):
    g = conv_net["g"]
    with pytest.raises(SnncError, match="trials=0"):
        snnc.compile(g, target="tvm:llvm", mode="relax", trials=0)
    with pytest.raises(SnncError, match="tune_minutes=-1"):
        snnc.compile(g, target="tvm:llvm", mode="relax", tune=True, tune_minutes=-1)
    with pytest.raises(SnncError, match="tvm:llvm only"):
        snnc.compile(g, target="tvm:cuda", tune=True)


def test_cli_tune_arguments_are_checked(tmp_path, capsys):
    torch.save(digits_snn(4).eval(), tmp_path / "snn.pt")
    with pytest.raises(SystemExit) as e:
        main(["compile", str(tmp_path / "snn.pt"), "--trust-model-file", "--input-shape", "1,1,8,8", "--T", "2",
              "--target", "tvm:llvm",
              "--tune", "--trials", "0", "-o", str(tmp_path / "n.so")])
    assert e.value.code == 2 and "expected a positive integer, got '0'" in capsys.readouterr().err
    assert main(["compile", str(tmp_path / "snn.pt"), "--trust-model-file", "--input-shape", "1,1,8,8", "--T", "2",
                 "--target", "onnx",
                 "--tune", "-o", str(tmp_path / "n.onnx")]) == 1
    assert "--tune: tuning is for --target tvm:llvm" in capsys.readouterr().err


@pytest.mark.slow
def test_tuning_database_is_written_reused_and_the_library_stays_exact(tmp_path, monkeypatch):
    monkeypatch.setenv("SNNC_CACHE_DIR", str(tmp_path / "cache"))
    net = _conv_lif_net((2, 16, 16))
    x = torch.randn(2, 2, 2, 8, 8) * 2
    g = unroll_timesteps(snnc.trace(net, x[0]), T=2)
    db = tmp_path / "db"
    # spike_convs="fp32": both convs are MetaSchedule tasks (int8 spike convs are hand-written TIR)
    m = snnc.compile(g, target="tvm:llvm", mode="relax", trials=2, database=db, progress=False, spike_convs="fp32")
    tuning = m.meta["tuning"]
    assert tuning["tasks"] == 2 and tuning["tuned_now"] == 2
    assert (db / "database_tuning_record.json").stat().st_size > 0
    _agree(m(x), snnc.compile(g, target="torch")(x))
    from snnc.targets import tvm_build
    tvm_build._MEMORY_CACHE.clear()  # as in a new process
    again = snnc.compile(g, target="tvm:llvm", mode="relax", trials=2, database=db, progress=False,
                         spike_convs="fp32")
    assert again.meta["tuning"]["tuned_now"] == 0  # nothing left to tune: database + cached library
    assert again.meta["tuning"]["reused"] and again.meta["tuning"]["tasks"] == 2  # no task extraction
    tvm_build._MEMORY_CACHE.clear()
    more = snnc.compile(g, target="tvm:llvm", mode="relax", trials=3, database=db, progress=False,
                        spike_convs="fp32", tune_minutes=0.05)
    assert "reused" not in more.meta["tuning"]  # more trials asked: the database is tuned further
    x3 = torch.randn(2, 3, 2, 8, 8) * 2  # a batch of 3 on a library tuned (static) for 2: chunks
    _agree(again(x3), snnc.compile(g, target="torch")(x3))


def test_a_complete_database_is_applied_without_tuning(tmp_path, monkeypatch):
    """A database that already holds ``trials`` records per kernel (here: the hand schedule's
    trace, committed as MetaSchedule would) is applied without tuning, the choice between its
    schedule and the hand schedule is recorded, outputs match, and other batch sizes run."""
    import tvm
    from tvm import relax, s_tir
    from tvm.s_tir import meta_schedule as ms

    from snnc.targets import tvm_build as tb
    from snnc.targets.tvm_lower import to_relax
    from snnc.targets.tvm_schedule import oc_steps
    monkeypatch.setenv("SNNC_CACHE_DIR", str(tmp_path / "cache"))
    net = _conv_lif_net((16, 16, 16))
    x = torch.randn(2, 2, 16, 8, 8) * 2
    g = unroll_timesteps(snnc.trace(net, x[0]), T=2)
    from snnc.targets.tvm import _prepare
    tdict = tb.llvm_target("host")
    target = tb.make_target(tdict)
    with target:
        legal = relax.get_pipeline("zero")(to_relax(_prepare(g, None), "cpu", batch="static"))
    (tmp_path / "db").mkdir()
    db = ms.database.JSONDatabase(work_dir=str(tmp_path / "db"))
    tasks = [t for t in ms.relax_integration.extract_tasks(legal, target) if "conv2d" in t.task_name]
    assert len(tasks) == 1 and tasks[0].weight == 2  # two convs of one shape: one task
    for t in tasks:
        sch = s_tir.Schedule(t.dispatched[0])
        oc_steps(sch)
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(t.dispatched[0]), [1e-3], target,
            ms.arg_info.ArgInfo.from_prim_func(t.dispatched[0]["main"])))
    m = snnc.compile(g, target="tvm:llvm", mode="relax", trials=1, database=tmp_path / "db", progress=False,
                     spike_convs="fp32")
    tuning = m.meta["tuning"]
    assert tuning["tasks"] == 1 and tuning["tuned_now"] == 0 and len(tuning["kernels"]) == 1  # one shared kernel
    assert all(k["use"] in ("tuned", "hand") and k["tuned_ms"] > 0 for k in tuning["kernels"].values())
    ref = snnc.compile(g, target="torch")
    _agree(m(x), ref(x))
    x3 = torch.randn(2, 3, 16, 8, 8) * 2
    _agree(m(x3), ref(x3))
    assert tvm is not None
