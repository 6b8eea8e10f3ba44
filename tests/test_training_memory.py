"""``snnc.training.reuse_freed_memory``: large CPU tensors freed by one training step are reused by
the next instead of being unmapped and faulted in again (counted page faults, not timed)."""
import subprocess
import sys

import pytest

_CHILD = r"""
import resource, torch, snnc
from torch import nn
from snnc.ops import LIF
from snnc.passes import insert_surrogate, unroll_timesteps
from snnc.training import reuse_freed_memory

torch.manual_seed(0)
g = insert_surrogate(unroll_timesteps(snnc.trace(nn.Sequential(nn.Linear(512, 1024), LIF(tau=2.0)),
                                                 torch.zeros(64, 512)), T=160), kind="atan").train()
x = torch.randn(160, 64, 512)   # activations [T*N, 1024] fp32 = 40 MiB: over glibc's mmap limit

def faults_per_step():
    g(x).sum().backward()       # warm-up
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        g.zero_grad(set_to_none=True)
        g(x).sum().backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 3

before = faults_per_step()
assert reuse_freed_memory()
after = faults_per_step()
print(before, after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_reuse_freed_memory_removes_the_page_faults_of_large_activations():
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = map(float, r.stdout.split())
    assert before > 20000          # each step maps and faults in its large tensors afresh
    assert after < before / 2, (before, after)  # measured 51k -> 20k here; bench net 154k -> 5k
