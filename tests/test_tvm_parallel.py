"""The hybrid tvm:llvm kernels on torch's OpenMP threads (targets/tvm_parallel.py): the same
spikes as with TVM's own pool, bit for bit, from a cached and an uncached build; the kernels' work
really lands on the threads torch's ops run on; the TVM-pool fallback when asked for."""
import os
import subprocess
import sys

import pytest
import torch

import snnc
from snnc.targets import tvm_parallel

sys.path.insert(0, os.path.dirname(__file__))
from test_spike_kernels import firing_case  # noqa: E402  (bench net, weights scaled so every layer fires)

pytest.importorskip("tvm")
pytestmark = pytest.mark.usefixtures("isolated_cache")
needs_openmp = pytest.mark.skipif(tvm_parallel.unavailable_reason() is not None,
                                  reason=f"kernels stay on TVM's pool: {tvm_parallel.unavailable_reason()}")


@pytest.fixture(scope="module")
def firing():
    # 18x18: a shape no other test file builds, so no library from an earlier test (hooked to
    # OpenMP for the rest of the process) is reused from the in-process build cache
    g, x = firing_case(18)
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
        xn = torch.rand(4, n, 3, 18, 18) * 2
        assert torch.equal(omp(xn), pool(xn))


_THREADS_SCRIPT = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
from test_spike_kernels import _firing_bench_net
import snnc
from snnc.passes import unroll_timesteps
torch.manual_seed(0)
net, x = _firing_bench_net(), torch.rand(4, 8, 3, 16, 16) * 2
g = unroll_timesteps(snnc.trace(net, x[0]), T=4)
torch.mm(torch.rand(512, 512), torch.rand(512, 512))  # torch's OpenMP team exists from here on
if sys.argv[2] == "build":
    snnc.compile(g, target="tvm:llvm")(x)
else:
    before = set(os.listdir("/proc/self/task"))
    m = snnc.compile(g, target="tvm:llvm")  # a cache hit: no LLVM, no race
    for _ in range(3):
        m(x)
    print(m.meta["kernel_threads"], len(set(os.listdir("/proc/self/task")) - before))
"""


@needs_openmp
@pytest.mark.skipif(torch.get_num_threads() < 2 or not os.path.exists("/proc/self/task"),
                    reason="needs two torch threads and Linux /proc")
def test_no_thread_but_torchs_runs_the_kernels(tmp_path):
    """In a fresh process whose library and race come from the cache, running the module starts
    no thread (TVM's pool would start its workers at the first parallel loop): the kernels ran on
    the threads torch already had. With ``SNNC_TVM_THREADS=tvm`` the pool's workers do appear."""
    env = dict(os.environ, SNNC_CACHE_DIR=str(tmp_path))
    run = lambda mode, **extra: subprocess.run(  # noqa: E731
        [sys.executable, "-c", _THREADS_SCRIPT, os.path.dirname(__file__), mode], env=dict(env, **extra),
        capture_output=True, text=True, timeout=600, check=True).stdout.split()
    run("build")
    assert run("check") == ["torch-openmp", "0"]
    new = run("check", SNNC_TVM_THREADS="tvm")[-1]
    assert int(new) >= 1
