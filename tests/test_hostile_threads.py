"""Every compiled module, and every loaded export, called from several threads at once on
different inputs gives exactly the single-thread result (hybrid: per-thread buffers; Relax VM:
one VM per thread; torch: a lock around the stateful graph; onnx / tvm:int: stateless calls)."""
import threading

import pytest
import torch

import snnc

import hostile_util as H

pytest.importorskip("tvm")

THREADS, CALLS = 4, 12  # with shared hybrid buffers: 35 of 48 calls wrong at this size


@pytest.fixture(autouse=True)
def _switch_often():
    """Switch threads every microsecond, so races that need an unlucky switch happen every run."""
    import sys
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


pytestmark = pytest.mark.usefixtures("isolated_cache")  # one fresh snnc cache for this file


def _hammer(module, batch=64):
    xs = [H.inputs(batch, seed=s) for s in range(THREADS * CALLS)]
    want = [module(x) for x in xs]  # one thread
    got, errors = {}, []
    start = threading.Barrier(THREADS)

    def work(t):
        start.wait()
        try:
            for i in range(t, len(xs), THREADS):
                got[i] = module(xs[i])
        except Exception as e:  # noqa: BLE001 - report any failure of a worker
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    wrong = [i for i in range(len(xs)) if not torch.equal(got[i], want[i])]
    assert wrong == [], f"{len(wrong)} of {len(xs)} calls wrong under threads"
    assert len({tuple(w.flatten().tolist()) for w in want}) > 1  # the inputs give different outputs


@pytest.mark.parametrize("target, options", [("torch", {}), ("onnx", {}), ("tvm:llvm", {"mode": "hybrid"}),
                                             ("tvm:llvm", {"mode": "relax"}), ("tvm:int", {})],
                         ids=["torch", "onnx", "hybrid", "relax", "tvm_int"])
def test_threads_get_the_single_thread_result(target, options, tmp_path):
    m = H.compiled(target, batch=64, width=256, **options)
    _hammer(m)
    _hammer(snnc.load(m.export(tmp_path / "net")))


def test_hybrid_with_tvm_convs_under_threads():
    """The hybrid's convolutions write preallocated buffers too."""
    from torch import nn

    from snnc.ops import IF, DirectEncoder, Readout
    from snnc.passes import unroll_timesteps
    torch.manual_seed(0)
    net = nn.Sequential(DirectEncoder(), nn.Conv2d(1, 8, 3, padding=1), IF(), nn.Flatten(),
                        nn.Linear(8 * 64, 4), Readout()).eval()
    g = unroll_timesteps(snnc.trace(net, torch.zeros(4, 1, 8, 8)), T=3)
    m = snnc.compile(g, target="tvm:llvm", convs="tvm")
    xs = [torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(s)) * 3 for s in range(THREADS * CALLS)]
    want = [m(x) for x in xs]
    got = {}

    def work(t):
        for i in range(t, len(xs), THREADS):
            got[i] = m(xs[i])
    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(got[i], want[i]) for i in range(len(xs)))
