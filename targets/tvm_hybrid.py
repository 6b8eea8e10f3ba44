"""The in-process fast path of ``tvm:llvm``: torch runs linear/pooling/BN, TVM runs the fused
neuron scans and readouts, on the same buffers; each Conv2d runs in whichever of torch (oneDNN)
and the hand-scheduled TVM conv (``tvm_schedule.py``) won a race on its shape at compile time.

Why: the fused neuron kernel is 10-25x faster than torch's per-step elementwise sequence, while
for convolutions oneDNN is usually the better code (TVM-NOTES.md (a)-(e); with the hand schedule
TVM wins some layers, e.g. the 3-channel first conv). The graph here is the unrolled spiking IR
itself with each neuron / readout / conv module swapped for a call that hands the torch tensors
to the TVM function through DLPack (zero copies) and writes into an output buffer preallocated
per shape (fresh allocations measured 5-20% slower end to end, TVM-NOTES.md (f)).

Thread safety: the preallocated buffers are per calling thread (keyed by thread id), so threads
calling one module on different inputs never write into each other's buffers; the kernels keep
no state between calls (the membrane lives in a scan's local registers).
"""
from __future__ import annotations

import copy
import hashlib
import math
import threading
from pathlib import Path

import torch
from torch import fx, nn

from snnc.ir import info
from snnc.ops import registry
from snnc.ops.coding import MergeTime, SplitTime
from snnc.report import fastest

from .spike_block import SpikeBlock, set_spike_formats
from .spike_conv import SpikeConv2d, SpikeLinear, binary_input, int8_isa
from .spike_fused import FUSED_ISAS, FusedKernel, aligned, fused_applies  # noqa: F401 (aligned: re-exported)
from .tvm_kernels import neuron_scan_kernel, pick_lanes, readout_kernel
from .tvm_lower import fused_scan_ok, multi_state, neuron_scan, recurrent_scan, state_kernel
from .tvm_recurrent import recurrent_kernel
from .tvm_schedule import conv2d_kernel


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

    def _out(self, shape, dtype, memory_format=torch.contiguous_format):
        if not self.reuse_output:  # a module called twice per run: each call needs its own output
            return torch.empty(shape, dtype=dtype, memory_format=memory_format)
        key = (threading.get_ident(), tuple(shape), dtype, memory_format)  # per thread: see the module doc
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = torch.empty(shape, dtype=dtype, memory_format=memory_format)
        return buf

    def forward(self, x):
        perm = _channels_last_perm(x) if self.threshold is None else None
        if perm is not None:  # a spike conv's channels_last output: run on its memory order
            inverse = [perm.index(d) for d in range(len(perm))]
            out = self._call(aligned(x.permute(perm)))
            return out.permute([i - 1 for i in inverse[1:]] if self.kind == "readout" else inverse)
        return self._call(aligned(x))

    def _call(self, x):
        steps = x.shape[0]
        if self.kind == "readout":
            out = self._out(x.shape[1:], x.dtype)
            self.fn(x.view(steps, -1), out.view(-1))
            return out
        out = self._out(x.shape, x.dtype)
        if self.threshold is None:
            self.fn(x.view(steps, -1), out.view(steps, -1))
        elif isinstance(self.threshold, list):   # a recurrent scan's weights
            self.fn(x.view(steps, -1), *self.threshold, out.view(steps, -1))
        else:
            self.fn(x.view(steps, -1), self.threshold, out.view(steps, -1))
        return out


class TVMConvCall(TVMKernelCall):
    """A 3x3-style ``nn.Conv2d`` run by whichever of torch (oneDNN fp32), the hand-scheduled TVM
    kernel (``tvm_schedule.py``, when the input has the compiled shape) and, for a 0/1 spike input,
    the int8 spike kernel (``spike_conv.SpikeConv2d``) won the race on its shape (``choice``)."""

    def __init__(self, conv, name, in_shape, reuse_output=True, spike=None):
        super().__init__("conv", name, reuse_output=reuse_output)
        self.conv, self.in_shape, self.choice, self.spike = conv, tuple(in_shape), "torch", spike
        self.weight = aligned(conv.weight.detach())
        self.bias = None if conv.bias is None else aligned(conv.bias.detach().reshape(1, -1, 1, 1))
        self.out_shape = tuple(conv(torch.zeros(1, *self.in_shape[1:])).shape[1:])

    @property
    def use_tvm(self):
        return self.choice == "tvm"

    def bind(self, lib):
        try:
            self.lib, self.fn = lib, lib[self.name]
        except AttributeError:  # the schedule did not apply at build time: torch runs it
            self.fn = None

    def options(self) -> list:
        return ["torch"] + (["tvm"] if self.fn is not None else []) + (["int8"] if self.spike is not None else [])

    def forward(self, x):
        if self.choice == "int8" and self.spike is not None:
            # a preallocated sum buffer: a fresh one costs page faults comparable to the sum itself
            out = self._out((x.shape[0], *self.out_shape), torch.float32, torch.channels_last)
            return self.spike(x, out=out)
        if not self.use_tvm or self.fn is None or tuple(x.shape) != self.in_shape:
            return self.conv(x)
        out = self._out((x.shape[0], *self.out_shape), x.dtype)
        args = (aligned(x), self.weight) + (() if self.bias is None else (self.bias,)) + (out,)
        self.fn(*args)
        return out

    def race(self, runs=2) -> str:
        """Time every option on this layer's shape (spike-like input); the fastest one runs."""
        return _race(self, torch.rand(self.in_shape) < 0.2, runs)


class SpikeLinearCall(nn.Module):
    """An ``nn.Linear`` on 0/1 spikes: torch fp32 or the int8 spike kernel, by race (``choice``)."""

    def __init__(self, linear, name, in_shape, spike):
        super().__init__()
        self.linear, self.name, self.in_shape, self.spike, self.choice = linear, name, tuple(in_shape), spike, "torch"

    def options(self) -> list:
        return ["torch", "int8"]

    def forward(self, x):
        return self.spike(x) if self.choice == "int8" else self.linear(x)

    def race(self, runs=2) -> str:
        return _race(self, torch.rand(self.in_shape) < 0.2, runs)


def _race(call, spikes, runs):
    x = spikes.float()

    def runner(choice):
        def run():
            call.choice = choice
            call(x)
        return run
    with torch.no_grad():
        winner, _ = fastest({choice: runner(choice) for choice in call.options()}, runs)
    if isinstance(call, TVMKernelCall):  # (nn.Module.buffers is a method elsewhere)
        call.buffers.clear()
    call.choice = "torch"
    return winner


def _channels_last_perm(x: torch.Tensor):
    """The permutation that makes a non-contiguous ``[T, N, C, *spatial]`` tensor contiguous with
    C last (a spike conv's channels_last output after ``time.split``), or None."""
    if x.dim() < 4 or x.is_contiguous():
        return None
    perm = [0, 1, *range(3, x.dim()), 2]
    return perm if x.permute(perm).is_contiguous() else None


def hybrid_graph(gm: fx.GraphModule, device: str = "cpu", spike_int8: bool = False, one_digit=()):
    """``(graph, make_kernels)``: a copy of the annotated multi-step graph whose spiking modules
    call TVM kernels, and a function returning the PrimFuncs to build (name -> PrimFunc, symbolic
    batch size; only called when the cache misses). ``spike_int8``: convs / linears whose input is
    0/1 spikes may also race the int8 spike kernels (``spike_conv.py``; within its error bound);
    ``one_digit``: ``{conv target: error bound}`` of the convs whose weights were rounded to one
    int8 digit (``spike_digits``): their fused kernel keeps one digit and states that bound."""
    spike_int8 = spike_int8 and device == "cpu" and int8_isa() is not None
    g = copy.deepcopy(gm)
    g.snnc_spec = gm.snnc_spec
    kernels, rules = {}, {}
    calls = [n.target for n in g.graph.nodes if n.op == "call_module"]
    # decided on the graph before its neurons become kernel calls
    binary = {n.name for n in g.graph.nodes if spike_int8 and n.op == "call_module" and binary_input(g, n)}
    for node in g.graph.nodes:
        if node.op != "call_module" or isinstance(g.get_submodule(node.target), TVMKernelCall):
            continue
        mod = g.get_submodule(node.target)
        once = calls.count(node.target) == 1
        rec = registry.module_record(mod)
        loops = rec is not None and rec.over_time == "loop"   # ops with a scan kernel (check_supported ran)
        if loops and rec.spiking_of(mod) == "yes" and (recurrent_scan(mod) is None or fused_scan_ok(mod)):
            shape, dtype = info(node).shape, str(info(node).dtype).replace("torch.", "")
            sample = shape[2:]
            name = f"scan_{len(kernels)}"
            if recurrent_scan(mod) is not None:   # its constants (weights) ride where a threshold would
                builder, args, kw, th = recurrent_kernel(mod, shape, dtype)
                kernels[name] = (builder, args, kw)
            elif multi_state(mod):
                th = None
                kernels[name] = (state_kernel, (mod, shape[0], None, dtype, device),
                                 dict(lanes=pick_lanes(math.prod(sample))))
            else:
                rule, th = neuron_scan(mod, sample, dtype)
                kernels[name] = (neuron_scan_kernel, (shape[0], None, dtype, rule),
                                 dict(device=device, lanes=pick_lanes(math.prod(sample))))
            th = None if th is None else [aligned(t) for t in th] if isinstance(th, list) else aligned(th)
            g.add_submodule(node.target, TVMKernelCall("scan", name, th, reuse_output=once))
            if th is None and not multi_state(mod):
                rules[node.name] = (rule, shape, dtype)
        elif type(mod) is nn.Conv2d and device == "cpu" and info(node.args[0]) is not None:
            in_shape = info(node.args[0]).shape
            name = f"conv_{len(kernels)}"
            kernels[name] = (conv2d_kernel, (copy.deepcopy(mod), in_shape), {})
            spike = _spike_layer(SpikeConv2d, node.name in binary, mod, in_shape)
            g.add_submodule(node.target, TVMConvCall(mod, name, in_shape, reuse_output=once, spike=spike))
        elif type(mod) is nn.Linear and node.name in binary and info(node.args[0]) is not None:
            spike = _spike_layer(SpikeLinear, True, mod)
            if spike is not None:
                name = f"linear_{len(kernels)}"
                kernels[name] = None  # nothing for TVM to build: only numbers the layers
                g.add_submodule(node.target, SpikeLinearCall(mod, name, info(node.args[0]).shape, spike))
        elif loops and rec.layout(mod, ["seq"]) == "step":   # a readout: [T, N, ...] -> [N, ...]
            shape, dtype = info(node.args[0]).shape, str(info(node).dtype).replace("torch.", "")
            name = f"readout_{len(kernels)}"
            kernels[name] = (readout_kernel, (shape[0], None, dtype),
                             dict(device=device, lanes=pick_lanes(math.prod(shape[2:]))))
            g.add_submodule(node.target, TVMKernelCall("readout", name, reuse_output=once))
    if spike_int8:
        _fuse_blocks(g, kernels, rules, binary, calls, dict(one_digit))
    g.recompile()
    # the built library depends on which kernels exist (blocks add some) and on their builders
    g.kernel_key = (sorted(k for k, v in kernels.items() if v is not None),
                    *(hashlib.sha256(Path(__file__).with_name(f).read_bytes()).hexdigest()[:16]
                      for f in ("spike_block.py", "spike_fused.py")))

    def make_kernels():
        built = {name: k[0](*k[1], **k[2]) for name, k in kernels.items() if k is not None}
        # conv2d_kernel returns (func, has_bias) or None (not schedulable: torch keeps it)
        return {name: (f[0] if isinstance(f, tuple) else f) for name, f in built.items() if f is not None}
    return g, make_kernels


def _fuse_blocks(g, kernels, rules, binary, calls, one_digit):
    """Replace each ``merge_time -> conv -> split_time -> neuron`` chain (nothing else reading the
    middle values, a scalar-threshold single-state neuron) by one ``SpikeBlock`` (spike_block.py)
    named as its conv, so races and cached choices keep their keys. On a VNNI host without AMX a
    block on spikes also gets the fused TVM runner (spike_fused.py), and a block whose readers can
    all run fused gets the kernels that write their padded uint8 input."""
    fused_isa = int8_isa() in FUSED_ISAS
    made = []
    for node in list(g.graph.nodes):
        if node.name not in rules:
            continue
        split = node.args[0]
        conv = split.args[0] if isinstance(split, fx.Node) and split.args else None
        merge = conv.args[0] if isinstance(conv, fx.Node) and conv.args else None
        if not (isinstance(merge, fx.Node) and merge.op == conv.op == split.op == "call_module"
                and isinstance(g.get_submodule(split.target), SplitTime)
                and isinstance(g.get_submodule(merge.target), MergeTime)
                and isinstance(g.get_submodule(conv.target), TVMConvCall)
                and all(len(n.users) == 1 for n in (merge, conv, split))):
            continue
        call, rule, (shape, dtype) = g.get_submodule(conv.target), rules[node.name][0], rules[node.name][1:]
        if dtype != "float32" or call.out_shape[0] % 16:
            continue
        kernels[call.name] = None  # its TVM conv is not built: a block runs oneDNN convs (or fused)
        spikes = conv.name in binary
        one = spikes and conv.target in one_digit   # its bound: against the weights before rounding
        fused = FusedKernel(call.conv, spikes, 1 if one else 2,
                            torch.full((call.conv.out_channels,), float(one_digit[conv.target])) if one else None) \
            if fused_isa and fused_applies(call.conv, call.in_shape, spikes) else None
        block = SpikeBlock(call.conv, call.in_shape, shape[0], call.name, {"f32": g.get_submodule(node.target).name},
                           spikes, reuse_output=calls.count(node.target) == 1, fused=fused)
        kernels.update(block.kernel_builders(rule, dtype))
        made.append((node, block, rule, dtype))
        g.add_submodule(node.target, block)
        node.args = (merge.args[0],) + tuple(node.args[1:])
        for n in (split, conv, merge):
            g.graph.erase_node(n)
            if calls.count(n.target) == 1:  # a module called only here
                g.delete_submodule(n.target)
    for node, block, rule, dtype in made:
        readers = [g.get_submodule(u.target) if u.op == "call_module" else None for u in node.users]
        pads = {r.conv.padding[0] if isinstance(r, SpikeBlock) and r.fused is not None else None for r in readers}
        if len(pads) == 1 and None not in pads:  # every reader may run fused, all with one padding
            block.out_pad = pads.pop()
            kernels.update(block.kernel_builders(rule, dtype))
    g.graph.lint()


def _spike_layer(cls, binary, mod, *args):
    """The int8 spike version of ``mod`` if its input is proven 0/1 and oneDNN takes the layer."""
    if not binary:
        return None
    try:
        return cls(mod, *args)
    except (ValueError, RuntimeError):  # e.g. grouped conv, or a shape oneDNN refuses
        return None


def raced_layers(g: fx.GraphModule) -> list:
    return [m for m in g.modules() if isinstance(m, (TVMConvCall, SpikeLinearCall, SpikeBlock))]


def race_convs(g: fx.GraphModule) -> dict:
    """``{layer name: "torch" | "tvm" | "int8" | "fused"}`` for every raced conv / linear / block (``race``)."""
    return {m.name: m.race() for m in raced_layers(g)}


def apply_conv_choices(g: fx.GraphModule, choices: dict) -> dict:
    """Set each raced layer's runner and return the choices in effect: one the layer cannot take
    (int8 on a non-spike input, tvm where the schedule did not apply, a cache from another CPU)
    leaves it in torch."""
    for m in raced_layers(g):
        choice = choices.get(m.name, "torch")
        m.choice = choice if choice in m.options() else "torch"
    set_spike_formats(g)
    return {m.name: m.choice for m in raced_layers(g)}


def spike_report(g: fx.GraphModule) -> dict:
    """Per layer that could take the int8 spike kernels: the runner in effect, the weight digits
    and the largest stated error bound (|y - y_exact| per output, any 0/1 input), the spike
    format it writes (blocks)."""
    report = {}
    for m in raced_layers(g):
        spike = m if isinstance(m, SpikeBlock) else getattr(m, "spike", None)
        if spike is None or getattr(spike, "packed", None) is None:
            continue
        bound = m.fused.error_bound if m.choice == "fused" else spike.error_bound
        digits = m.fused.digits if m.choice == "fused" else 2
        row = {"runner": m.choice, "digits": digits if m.choice in ("int8", "fused") else "fp32",
               "error_bound": float(bound.max()) if m.choice in ("int8", "fused") else 0.0}
        if isinstance(m, SpikeBlock):
            row["writes"] = m.out_format
        report[m.name] = row
    return report


def bind_kernels(g: fx.GraphModule, lib) -> None:
    """Point every kernel call of the hybrid graph at its function in ``lib``."""
    for m in g.modules():
        if isinstance(m, (TVMKernelCall, SpikeBlock)):
            m.bind(lib)


def run_hybrid(g: fx.GraphModule, inputs):
    """Run the hybrid graph; outputs that live in a preallocated kernel buffer are copied out so
    the next call cannot overwrite what the caller holds."""
    with torch.no_grad():
        out = g(*inputs)
    me = threading.get_ident()
    owned = {b.data_ptr() for m in g.modules() if isinstance(m, (TVMKernelCall, SpikeBlock))
             for (tid, *_), b in list(m.buffers.items()) if tid == me}
    return fx.node.map_aggregate(
        out, lambda t: t.clone() if isinstance(t, torch.Tensor) and t.data_ptr() in owned else t)
