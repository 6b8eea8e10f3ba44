"""The in-process fast path of ``tvm:llvm``: torch (oneDNN) runs conv/linear/pooling, TVM runs the
fused neuron scans and readouts, on the same buffers.

Why: this TVM wheel has no oneDNN offload and no tuned x86 conv schedules, so Relax convolutions
are 25-40x slower than torch's (TVM-NOTES.md (a)-(e)), while the fused neuron kernel is about 10x
faster than torch's per-step elementwise sequence. The graph here is the unrolled spiking IR
itself, with each neuron / readout module swapped for a ``TVMKernelCall`` that hands the
torch tensors to the TVM function through DLPack (zero copies) and writes into an output buffer
preallocated per shape (fresh allocations measured 5-20% slower end to end).
"""
from __future__ import annotations

import copy
import math

import torch
from torch import fx, nn

from snnc.ir import info
from snnc.ops import Neuron, Readout

from .tvm_kernels import neuron_scan_kernel, pick_lanes, readout_kernel
from .tvm_lower import neuron_scan


class TVMKernelCall(nn.Module):
    """Calls one compiled TVM kernel on ``[T, N, ...]``: a neuron scan (-> ``[T, N, ...]``) or a
    readout (-> ``[N, ...]``). The kernel is looked up by name in the shared library."""

    def __init__(self, kind: str, name: str, threshold=None, reuse_output=True):
        super().__init__()
        self.kind, self.name, self.reuse_output = kind, name, reuse_output
        self.threshold = threshold
        self.lib = None
        self.fn = None
        self.buffers = {}

    def bind(self, lib):
        self.lib, self.fn = lib, lib[self.name]

    def _out(self, shape, dtype):
        if not self.reuse_output:  # a module called twice per run: each call needs its own output
            return torch.empty(shape, dtype=dtype)
        key = (tuple(shape), dtype)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty(shape, dtype=dtype)
        return buf

    def forward(self, x):
        x = x.contiguous()
        steps = x.shape[0]
        if self.kind == "readout":
            out = self._out(x.shape[1:], x.dtype)
            self.fn(x.view(steps, -1), out.view(-1))
            return out
        out = self._out(x.shape, x.dtype)
        if self.threshold is None:
            self.fn(x.view(steps, -1), out.view(steps, -1))
        else:
            self.fn(x.view(steps, -1), self.threshold, out.view(steps, -1))
        return out


def hybrid_graph(gm: fx.GraphModule, device: str = "cpu"):
    """``(graph, make_kernels)``: a copy of the annotated multi-step graph whose spiking modules
    call TVM kernels, and a function returning the PrimFuncs to build (name -> PrimFunc, symbolic
    batch size; only called when the cache misses)."""
    g = copy.deepcopy(gm)
    g.snnc_spec = gm.snnc_spec
    kernels = {}
    calls = [n.target for n in g.graph.nodes if n.op == "call_module"]
    for node in g.graph.nodes:
        if node.op != "call_module" or isinstance(g.get_submodule(node.target), TVMKernelCall):
            continue
        mod = g.get_submodule(node.target)
        once = calls.count(node.target) == 1
        if isinstance(mod, Neuron):
            shape, dtype = info(node).shape, str(info(node).dtype).replace("torch.", "")
            sample = shape[2:]
            rule, th = neuron_scan(mod, sample, dtype)
            name = f"scan_{len(kernels)}"
            kernels[name] = (neuron_scan_kernel, (shape[0], None, dtype, rule),
                             dict(device=device, lanes=pick_lanes(math.prod(sample))))
            g.add_submodule(node.target, TVMKernelCall("scan", name, th, reuse_output=once))
        elif isinstance(mod, Readout):
            shape, dtype = info(node.args[0]).shape, str(info(node).dtype).replace("torch.", "")
            name = f"readout_{len(kernels)}"
            kernels[name] = (readout_kernel, (shape[0], None, dtype),
                             dict(device=device, lanes=pick_lanes(math.prod(shape[2:]))))
            g.add_submodule(node.target, TVMKernelCall("readout", name, reuse_output=once))
    g.recompile()
    return g, lambda: {name: build(*args, **kw) for name, (build, args, kw) in kernels.items()}


def bind_kernels(g: fx.GraphModule, lib) -> None:
    for m in g.modules():
        if isinstance(m, TVMKernelCall):
            m.bind(lib)


def run_hybrid(g: fx.GraphModule, inputs):
    """Run the hybrid graph; outputs that live in a preallocated kernel buffer are copied out so
    the next call cannot overwrite what the caller holds."""
    with torch.no_grad():
        out = g(*inputs)
    owned = {b.data_ptr() for m in g.modules() if isinstance(m, TVMKernelCall) for b in m.buffers.values()}
    return fx.node.map_aggregate(
        out, lambda t: t.clone() if isinstance(t, torch.Tensor) and t.data_ptr() in owned else t)
