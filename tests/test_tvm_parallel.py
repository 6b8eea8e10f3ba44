"""The hybrid tvm:llvm kernels on torch's OpenMP threads (targets/tvm_parallel.py): the same
spikes as with TVM's own pool, bit for bit, from a cached and an uncached build; the kernels' work
really lands on the threads torch's ops run on; the TVM-pool fallback when asked for."""
import os
import sys
import time

import pytest
import torch

import snnc
from snnc.passes import unroll_timesteps
from snnc.targets import tvm_parallel

sys.path.insert(0, os.path.dirname(__file__))
from test_spike_kernels import _firing_bench_net  # noqa: E402  (bench net, weights scaled so every layer fires)

pytest.importorskip("tvm")
pytestmark = pytest.mark.usefixtures("isolated_cache")
needs_openmp = pytest.mark.skipif(tvm_parallel.unavailable_reason() is not None,
                                  reason=f"kernels stay on TVM's pool: {tvm_parallel.unavailable_reason()}")


@pytest.fixture(scope="module")
def firing():
    net = _firing_bench_net()
    x = torch.rand(4, 3, 3, 16, 16) * 2
    g = unroll_timesteps(snnc.trace(net, x[0]), T=4)
    return g, x, snnc.run(g, x)


@needs_openmp
@pytest.mark.parametrize("cache", [True, False])
def test_kernels_on_torchs_threads_give_tvm_pools_spikes_bit_for_bit(firing, monkeypatch, cache):
    g, x, ref = firing
    monkeypatch.setenv("SNNC_TVM_THREADS", "tvm")
    pool = snnc.compile(g, target="tvm:llvm", cache=cache)
    monkeypatch.delenv("SNNC_TVM_THREADS")
    omp = snnc.compile(g, target="tvm:llvm", cache=cache)
    assert pool.meta["kernel_threads"] == "tvm-pool: SNNC_TVM_THREADS=tvm"
    assert omp.meta["kernel_threads"] == "torch-openmp"
    choices = dict(omp.meta["hybrid_convs"])
    from snnc.targets.tvm_hybrid import apply_conv_choices
    apply_conv_choices(pool._hybrid, choices)  # the same runners (the races may differ by timing)
    got = omp(x)
    assert torch.equal(got, pool(x))
    assert (got == ref).float().mean().item() >= 0.999
    for n in (1, 5):  # other batch sizes: other splits of the parallel loops
        xn = torch.rand(4, n, 3, 16, 16) * 2
        assert torch.equal(omp(xn), pool(xn))


def _busy_threads(fn, seconds=0.3):
    """Thread ids of this process that used >= 10% of ``seconds`` of CPU while ``fn`` ran in a loop."""
    def cpu():
        out = {}
        for t in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{t}/schedstat") as f:
                    out[t] = int(f.read().split()[0])
            except OSError:
                pass
        return out
    a, t0 = cpu(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
    b = cpu()
    return {t for t in b if b[t] - a.get(t, 0) > 0.1 * seconds * 1e9}


@needs_openmp
@pytest.mark.skipif(torch.get_num_threads() < 2 or not os.path.exists("/proc/self/task"),
                    reason="needs two torch threads and Linux /proc")
def test_the_kernels_work_lands_on_the_threads_torch_ops_use(firing, monkeypatch):
    g, x, _ = firing
    big = torch.rand(4096, 4096)
    torch_threads = _busy_threads(lambda: torch.mm(big[:512], big))
    xs = torch.rand(4, 32, 3, 16, 16) * 2
    for setting, expect_same in (("tvm", False), ("torch", True)):
        monkeypatch.setenv("SNNC_TVM_THREADS", setting)
        m = snnc.compile(g, target="tvm:llvm", cache=False)
        kernel_threads = _busy_threads(lambda: m(xs))
        assert len(kernel_threads) >= 2  # the main thread and a worker
        assert (kernel_threads <= torch_threads) is expect_same, (setting, kernel_threads, torch_threads)
