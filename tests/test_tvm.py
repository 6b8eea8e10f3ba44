"""tvm:llvm / tvm:cuda: differential tests against the reference interpreter, export/load, cache,
CUDA source checks (built with nvcc, not run: no GPU here), RPC on loopback, error messages."""
import os
import re
import subprocess
import sys

import pytest
import torch
from torch import nn

import snnc
from snnc.errors import InputError, SnncError, UnsupportedOp
from snnc.ops import IF, LIF, DirectEncoder, ParametricLIF, PoissonEncoder, Readout
from snnc.passes import unroll_timesteps
from snnc.zoo import bench_net, digits_snn

tvm = pytest.importorskip("tvm")


pytestmark = pytest.mark.usefixtures("isolated_cache")  # one fresh snnc cache for this file


@pytest.fixture(scope="module")
def digits():
    """digits_snn at width 4, T=4, batch 3, and its hybrid and standalone (Relax) modules."""
    torch.manual_seed(1)
    x = torch.rand(3, 1, 8, 8) * 3
    g = _graph(digits_snn(4), x, T=4)
    return {"x": x, "g": g, "ref": snnc.run(g, x),
            "hybrid": snnc.compile(g, target="tvm:llvm"),
            "relax": snnc.compile(g, target="tvm:llvm", mode="relax")}


def _graph(model, x, T):
    model.eval()
    return unroll_timesteps(snnc.trace(model, x), T=T)


def _agree(out, ref, spikes):
    assert out.shape == ref.shape
    if spikes:
        assert (out == ref).float().mean().item() >= 0.999
    else:
        assert (out - ref).abs().max().item() <= 1e-4


def _converted_if_net(width=4):
    """A converted-style net: direct input, per-channel thresholds, IF with subtract reset,
    membrane readout (what threshold balancing of digits_cnn produces)."""
    return nn.Sequential(
        DirectEncoder(), nn.Conv2d(1, width, 3, padding=1), IF(v_th=torch.rand(width, 1, 1) + 0.5),
        nn.AvgPool2d(2), nn.Conv2d(width, width, 3, padding=1), IF(v_th=0.8, reset="zero", compare=">"),
        nn.Flatten(), nn.Linear(width * 16, 10), Readout("membrane"))


@pytest.mark.parametrize("mode", ["hybrid", "relax"])
def test_digits_snn_matches_reference(digits, mode):
    m = digits[mode]
    assert m.mode == mode
    _agree(m(digits["x"]), digits["ref"], spikes=False)


@pytest.mark.parametrize("mode", ["hybrid", "relax"])
def test_bench_net_spikes_match_reference(mode):
    x = torch.randn(3, 2, 3, 8, 8) * 2
    net = bench_net((3, 8, 16))
    with torch.no_grad():
        for conv in net[0::2]:
            conv.weight *= 8  # default init barely fires at 8 channels
    g = _graph(net, x[0], T=3)
    m = snnc.compile(g, target="tvm:llvm", mode=mode)
    out, ref = m(x), snnc.run(g, x)
    _agree(out, ref, spikes=True)
    assert 0.01 < ref.mean().item() < 0.99  # the comparison is not between two all-zero tensors


@pytest.mark.parametrize("mode", ["hybrid", "relax"])
def test_converted_if_net_per_channel_threshold(mode):
    x = torch.rand(4, 1, 8, 8)
    g = _graph(_converted_if_net(), x, T=6)
    _agree(snnc.compile(g, target="tvm:llvm", mode=mode)(x), snnc.run(g, x), spikes=False)


@pytest.mark.parametrize("neuron", [
    LIF(decay=0.75, decay_input=True, v_leak=0.1, v_init=0.3),
    LIF(tau=3.0, reset="zero", v_reset=-0.2, compare=">"),
    ParametricLIF(init_tau=2.5, v_leak=-0.1),
    IF(v_th=torch.tensor([0.5, 1.0, 1.5]).view(3, 1, 1)),
])
def test_neuron_variants_are_exact(neuron):
    x = torch.randn(5, 2, 3, 4, 4) * 2
    g = _graph(nn.Sequential(neuron), x[0], T=5)
    ref = snnc.run(g, x)
    assert 0.05 < ref.mean().item() < 0.95
    assert torch.equal(snnc.compile(g, target="tvm:llvm")(x), ref)


def test_hybrid_takes_any_batch_and_outputs_are_not_overwritten(digits):
    x, g, m = digits["x"], digits["g"], digits["hybrid"]
    big = torch.rand(7, 1, 8, 8)
    a = m(big)
    b = m(x)
    _agree(a, snnc.run(g, big), spikes=False)
    _agree(b, snnc.run(g, x), spikes=False)


def test_export_load_round_trip(digits, tmp_path):
    x, m = digits["x"], digits["hybrid"]
    path = m.export(tmp_path / "digits.so")
    loaded = snnc.load(path)
    assert loaded.mode == "relax" and loaded.meta["T"] == 4 and loaded.meta["compiled_mode"] == "hybrid"
    _agree(loaded(x), digits["ref"], spikes=False)
    x2 = torch.rand(2, 1, 8, 8) * 3  # the library has a symbolic batch: any batch size runs
    _agree(loaded(x2), snnc.run(digits["g"], x2), spikes=False)
    with pytest.raises(InputError, match=r"expected shape \[3, 1, 8, 8\] \(any batch size\)"):
        loaded(torch.rand(2, 1, 7, 8))
    with pytest.raises(SnncError, match="exists"):
        m.export(path)
    torch.save(digits["x"], tmp_path / "x.pt")
    script = (f"import torch, snnc; m = snnc.load({str(path)!r}); "
              f"torch.save(m(torch.load({str(tmp_path / 'x.pt')!r})), {str(tmp_path / 'y.pt')!r})")
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)  # no model code there
    _agree(torch.load(tmp_path / "y.pt"), digits["ref"], spikes=False)


def test_second_compile_hits_the_cache(digits, monkeypatch):
    from snnc.targets import tvm_build
    tvm_build._MEMORY_CACHE.clear()  # as in a new process: the disk cache serves it

    def no_build(*a, **k):
        raise AssertionError("a cached graph was built again")
    with monkeypatch.context() as mp:  # served from the disk cache: TVM's builder is never called
        mp.setattr(tvm_build, "build_relax", no_build)
        m = snnc.compile(digits["g"], target="tvm:llvm", mode="relax")
    _agree(m(digits["x"]), digits["ref"], spikes=False)
    changed = snnc.compile(_graph(digits_snn(4), digits["x"], T=4), target="tvm:llvm")  # new weights
    assert not torch.equal(changed(digits["x"]), digits["ref"])


def test_dump_dir_writes_relax_module(digits, tmp_path):
    snnc.compile(digits["g"], target="tvm:llvm", dump_dir=tmp_path)
    text = (tmp_path / "tvm_llvm.relax.py").read_text()
    assert "R.call_tir" in text and "snn_lif_scan" in text and "R.nn.conv2d" in text


def test_cuda_builds_one_fused_kernel_per_neuron_layer(digits, tmp_path):
    from snnc.targets.tvm import cuda_source
    g = digits["g"]
    m = snnc.compile(g, target="tvm:cuda", arch="sm_80", dump_dir=tmp_path)
    src = cuda_source(m.relax_lib.module)
    assert src == (tmp_path / "tvm_cuda.cu").read_text()
    scans = re.findall(r'__global__ void __launch_bounds__\(\d+\) (snn_lif_scan\w*_kernel)\([^)]*\) \{', src)
    # three LIF layers, no per-timestep kernels; with the symbolic batch, layers whose rule and
    # sample size give the same kernel share it
    assert 1 <= len(scans) <= 3
    assert src.count("for (int t = 0; t < 4; ++t)") >= len(scans)
    body = src.split(f"{scans[0]}(")[2].split("\n}\n")[0]
    assert "for (int t = 0; t < 4; ++t)" in body  # the time loop is inside the kernel
    assert body.count("S_ptr[") == 1  # spikes written once per step, membrane in a register
    assert "snn_readout_kernel" in src
    if tvm.cuda(0).exist:  # a lent GPU: run it
        _agree(m(digits["x"]), digits["ref"], spikes=False)
    else:
        with pytest.raises(SnncError, match="no CUDA device"):
            m(digits["x"])
    with pytest.raises(SnncError, match="arch"):
        snnc.compile(g, target="tvm:cuda", arch="ampere")


def test_unsupported_op_names_node_and_lists_supported():
    x = torch.rand(2, 1, 8, 8)
    g = _graph(nn.Sequential(PoissonEncoder(seed=1), nn.Conv2d(1, 2, 3), LIF(tau=2.0)), x, T=2)
    with pytest.raises(UnsupportedOp, match=r"node %\w+ .*snn\.poisson_encoder.*supported: .*nn\.conv2d.*snn\.lif"):
        snnc.compile(g, target="tvm:llvm")


def test_per_step_graph_needs_T():
    x = torch.rand(2, 1, 8, 8) * 3
    g = snnc.trace(digits_snn(4).eval(), x)
    with pytest.raises(SnncError, match="unroll_timesteps"):
        snnc.compile(g, target="tvm:llvm")
    m = snnc.compile(g, target="tvm:llvm", T=3)
    _agree(m(x), snnc.run(g, x, T=3), spikes=False)


def test_run_remote_over_loopback_rpc(digits):
    from tvm import rpc
    x, m = digits["x"], digits["hybrid"]
    server = rpc.Server(host="127.0.0.1", port=9091, port_end=9199)
    try:
        out = m.run_remote("127.0.0.1", server.port, x)
    finally:
        server.terminate()
    _agree(out, digits["ref"], spikes=False)


def test_run_remote_names_an_unreachable_server(digits):
    with pytest.raises(SnncError, match="cannot reach the TVM RPC server 127.0.0.1:1"):
        digits["hybrid"].run_remote("127.0.0.1", 1, digits["x"], session_timeout=2)


def test_shared_neuron_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lif = LIF(tau=2.0)

        def forward(self, x):
            return self.lif(x) + self.lif(x * 2)
    x = torch.randn(4, 2, 3, 4, 4) * 2
    g = _graph(Twice(), x[0], T=4)
    _agree(snnc.compile(g, target="tvm:llvm")(x), snnc.run(g, x), spikes=True)


@pytest.mark.parametrize("stride,cout", [(1, 32), (2, 12)])
def test_conv_schedule_applies_and_is_exact_enough(stride, cout):
    from tvm import relax
    from tvm.relax.frontend.torch import from_fx
    from snnc.targets import tvm_build as tb
    from snnc.targets.tvm_schedule import schedule_conv2d
    conv = nn.Conv2d(8, cout, 3, padding=1, stride=stride)
    g = snnc.trace(nn.Sequential(conv), torch.zeros(2, 8, 12, 12))
    mod = from_fx(g, [((2, 8, 12, 12), "float32")])
    mod = tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern(),
                                    relax.transform.FuseOps(), relax.transform.FuseTIR()])(mod)
    name, func = next((gv.name_hint, f) for gv, f in mod.functions.items() if "conv2d" in gv.name_hint)
    scheduled = schedule_conv2d(func)
    assert scheduled is not None, f"{name} was left unscheduled"
    text = scheduled.script()
    assert "T.parallel" in text and "T.vectorized" in text and '"local"' in text
    lib = tb.build_kernels({"conv": scheduled}, tb.llvm_target())
    x, out = torch.randn(2, 8, 12, 12), torch.empty(2, cout, *conv(torch.zeros(1, 8, 12, 12)).shape[2:])
    lib["conv"](x, conv.weight.detach().contiguous(), conv.bias.detach().view(1, -1, 1, 1).contiguous(), out)
    assert (out - conv(x).detach()).abs().max().item() < 1e-4


def test_hybrid_convs_in_tvm_or_torch_agree():
    net = bench_net((3, 16, 16))
    with torch.no_grad():
        for conv in net[0::2]:
            conv.weight *= 6
    x = torch.randn(2, 2, 3, 8, 8) * 2
    g = _graph(net, x[0], T=2)
    ref = snnc.run(g, x)
    forced = snnc.compile(g, target="tvm:llvm", convs="tvm")
    assert forced.meta["hybrid_convs"] == {"conv_0": "tvm", "conv_2": "tvm"}
    _agree(forced(x), ref, spikes=True)
    other = torch.randn(2, 3, 3, 8, 8) * 2  # another batch size: torch runs the convs
    _agree(forced(other), snnc.run(g, other), spikes=True)
    auto = snnc.compile(g, target="tvm:llvm", spike_int8=False)  # fp32 race: TVM or oneDNN
    assert set(auto.meta["hybrid_convs"].values()) <= {"tvm", "torch"}
    _agree(auto(x), ref, spikes=True)
    default = snnc.compile(g, target="tvm:llvm")  # the int8 spike kernels join where the host has them
    assert set(default.meta["hybrid_convs"].values()) <= {"tvm", "torch", "int8", "fused"}  # fused: VNNI hosts
    _agree(default(x), ref, spikes=True)
    with pytest.raises(SnncError, match="convs="):
        snnc.compile(g, target="tvm:llvm", convs="gpu")


def _dyadic(shape, scale=8, lo=-4, hi=5):
    """Multiples of 1/scale with small numerators: every sum the net forms is exact in float32,
    so the reduction order of torch, oneDNN and TVM cannot matter and outputs must be equal."""
    return torch.randint(lo, hi, shape).float() / scale


def _unaligned(x):
    """``x`` copied into a view that starts 4 bytes past a 64-byte boundary (a batch slice like
    ``x_test[:1]`` of a tensor that does not start on one)."""
    buf = torch.empty(x.numel() + 32)
    start = next(i for i in range(1, 16) if (buf.data_ptr() + 4 * i) % 64 == 4)
    view = buf[start:start + x.numel()].view(x.shape)
    view.copy_(x)
    assert view.data_ptr() % 64 == 4
    return view


@pytest.mark.parametrize("batch", [1, 3])
def test_converted_digits_net_from_unaligned_slices_is_exact(tmp_path, batch):
    """Regression: what ``snnc.convert`` makes of digits_cnn (direct encoder hoisted after the first
    conv, IF with v_init=0.5, avg-pool, flatten, linear, membrane readout) fed a batch slice that is
    not 64-byte aligned. The TVM kernels assume 64-byte aligned buffers and tvm-ffi passes torch
    pointers unchecked, so the hybrid's TVM conv read the input with aligned vector loads: SIGSEGV."""
    torch.manual_seed(2)
    net = nn.Sequential(DirectEncoder(), nn.Conv2d(1, 16, 3, padding=1), IF(v_init=0.5),
                        nn.Conv2d(16, 8, 3, padding=1), IF(v_init=0.5), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(8 * 16, 12), IF(v_init=0.5), nn.Linear(12, 10), Readout("membrane"))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(_dyadic(p.shape))
    x = _unaligned(torch.randint(0, 9, (batch, 1, 8, 8)).float() / 8)
    g = _graph(net, x, T=4)
    assert [n.target for n in g.graph.nodes if n.op == "call_module"][:2] == ["1", "encoder_1"]  # hoisted
    ref = snnc.run(g, x.clone())
    assert 0.05 < ref.abs().mean().item() and ref.std().item() > 0  # not an all-silent net
    hybrid = snnc.compile(g, target="tvm:llvm", convs="tvm")
    assert hybrid.meta["hybrid_convs"] == {"conv_0": "tvm", "conv_2": "tvm"}
    assert torch.equal(hybrid(x), ref)
    relax_mod = snnc.compile(g, target="tvm:llvm", mode="relax")
    assert torch.equal(relax_mod(x), ref)
    loaded = snnc.load(hybrid.export(tmp_path / "net.so"))
    first = loaded(x)
    assert torch.equal(first, ref)
    other = x.flip(0) * 0.5
    assert torch.equal(loaded(other), snnc.run(g, other.clone()))
    assert torch.equal(first, ref)  # the VM did not reuse the buffer the first output lives in
    assert torch.equal(loaded(x), ref)  # and no state carried over between calls


@pytest.mark.parametrize("user_env", [{}, {"TVM_NUM_THREADS": "1"}])
def test_tvm_thread_pool_uses_torch_threads_unless_the_user_chose(user_env):
    """TVM alone would size its pool to half the logical CPUs on x86 (one thread on a 2-core host
    without SMT); snnc makes it follow torch, and a TVM_NUM_THREADS the user set wins."""
    env = {k: v for k, v in os.environ.items() if k not in ("TVM_NUM_THREADS", "OMP_NUM_THREADS")} | user_env
    code = ("import torch, tvm_ffi, snnc.targets.tvm_build; "
            "print(torch.get_num_threads(), tvm_ffi.get_global_func('runtime.NumThreads')())")
    torch_threads, tvm_threads = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                                text=True, check=True).stdout.split()
    assert tvm_threads == user_env.get("TVM_NUM_THREADS", torch_threads)
