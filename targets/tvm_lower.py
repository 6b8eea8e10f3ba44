"""Lowering of the unrolled (multi-step) spiking IR to a Relax ``IRModule``.

Standard layers go through TVM's torch frontend (``TorchFXImporter``: conv, linear, BN, pooling,
reshapes, arithmetic); the spiking ops go through snnc's converter table ``SPIKING_CONVERTERS``
below, which the importer consults like its own table. Each neuron layer becomes ONE
``call_tir`` of the fused scan kernel in ``tvm_kernels.py`` (the T loop inside the kernel), not T
copies of an elementwise update.

Assumes: a multi-step graph (``unroll_timesteps``), neurons in ``step_mode="m"`` on ``[T, N, ...]``.
Guarantees: the Relax function ``main`` takes the graph's inputs (static shapes from
``gm.snnc_spec``) and returns what the graph returns; the semantics are those of
``snnc/ops/neurons.py`` and ``snnc/ops/coding.py`` (tested against ``snnc.run``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import tvm
from torch import fx, nn
from tvm import relax
from tvm.relax.frontend.torch.fx_translator import TorchFXImporter
from tvm.script import tirx as T

from snnc.errors import UnsupportedOp, node_ref
from snnc.ir import FUNCTION_OPS, METHOD_OPS, MODULE_OPS, info, op_name
from snnc.ops import IF, LIF, DirectEncoder, MergeTime, Neuron, ParametricLIF, Readout, SplitTime, is_snnc_op

from .tvm_kernels import NeuronScan, neuron_scan_kernel, readout_kernel

OPAQUE = 8  # relay/relax OpPatternKind kOpaque: FuseOps must not merge a hand-scheduled kernel


# --- neuron rule: snnc neuron module -> NeuronScan ------------------------------------------------

def _f(dtype, value):
    """A Python float as a constant of ``dtype``: torch rounds a Python scalar to the tensor's
    dtype the same way, so the kernel sees the reference's constants bit for bit."""
    return T.Cast(dtype, float(np.asarray(value, dtype=dtype)))


def charge_rule(neuron, dtype="float32"):
    """``charge(v, x)`` for an snnc neuron, op for op as its ``charge`` method (same rounding).
    Exact types only: a subclass may redefine ``charge``, and must not be lowered as its base."""
    kind = type(neuron)
    if kind is IF:
        return lambda v, x: v + x
    if kind is LIF:
        decay, gain, leak = _f(dtype, neuron.decay), _f(dtype, neuron.gain), _f(dtype, neuron.v_leak)
        if neuron.v_leak == 0.0:
            leaked = lambda v: v * decay
        else:
            leaked = lambda v: leak + (v - leak) * decay
        if neuron.decay_input:
            return lambda v, x: leaked(v) + x * gain
        return lambda v, x: leaked(v) + x
    if kind is ParametricLIF:
        k = _f(dtype, neuron.w.detach().float().sigmoid().item())
        leak = _f(dtype, neuron.v_leak)
        return lambda v, x: v + (x - (v - leak)) * k
    raise UnsupportedOp(f"{type(neuron).__name__} has no TVM lowering; supported neurons: "
                        f"{', '.join(sorted(c.op_name for c in (IF, LIF, ParametricLIF)))}")


def threshold_layout(v_th, sample_shape):
    """``(values, size, inner)`` for the kernel's threshold buffer, or ``None`` for a scalar.

    A per-channel threshold (``[C, 1, 1]``) becomes C values read at ``(i // (H*W)) % C``; any
    other broadcastable tensor is expanded to one whole sample (``inner = 1``)."""
    if not isinstance(v_th, torch.Tensor):
        return None
    full = torch.broadcast_to(v_th.detach().float(), tuple(sample_shape))
    if full.dim() >= 1:
        per_channel = full.reshape(full.shape[0], -1)
        if bool((per_channel == per_channel[:, :1]).all()):
            return per_channel[:, 0].contiguous(), full.shape[0], per_channel.shape[1]
    flat = full.reshape(-1).contiguous()
    return flat, flat.numel(), 1


def neuron_scan(neuron, sample_shape, dtype="float32"):
    """``(NeuronScan, threshold values or None)`` for an snnc neuron on samples of ``sample_shape``."""
    layout = threshold_layout(neuron.v_th, sample_shape)
    common = dict(compare=neuron.compare, reset=neuron.reset_mode, v_reset=neuron.v_reset,
                  v_init=neuron.v_init)
    if layout is None:
        return NeuronScan(charge_rule(neuron, dtype), v_th=float(neuron.v_th), **common), None
    values, size, inner = layout
    return NeuronScan(charge_rule(neuron, dtype), v_th="buffer", threshold_size=size,
                      threshold_inner=inner, **common), values


def opaque(func):
    """Mark a hand-scheduled kernel so FuseOps leaves it whole and dlight leaves its schedule."""
    return (func.without_attr("global_symbol")  # the module names it (several layers, one kernel name)
            .with_attr("op_pattern", OPAQUE).with_attr("tir.is_scheduled", True))


# --- converters: one per spiking op, called by the importer with the fx node -------------------

def _seq_shape(node):
    i = info(node)
    return tuple(int(s) for s in i.shape), str(i.dtype).replace("torch.", "")


def _reshape(bb, x, shape):
    """``reshape(x, shape)``, looking through a reshape that produced ``x``: the time merge /
    split around every neuron would otherwise leave reshape-of-reshape chains that FuseOps turns
    into copy kernels instead of the free views RewriteDataflowReshape makes of single reshapes."""
    bound = bb.lookup_binding(x) if isinstance(x, relax.Var) else None
    if isinstance(bound, relax.Call) and bound.op == tvm.ir.Op.get("relax.reshape"):
        x = bound.args[0]
    return bb.emit(relax.op.reshape(x, shape))


def _convert_neuron(imp, node):
    mod = imp.named_modules[node.target]
    if not fused_scan_ok(mod):
        return _convert_exported(imp, node)
    (shape, dtype), x = _seq_shape(node), imp.env[node.args[0]]
    steps, M = shape[0], math.prod(shape[1:])
    rule, th = neuron_scan(mod, shape[2:], dtype)
    name = f"{type(mod).op_name.replace('.', '_')}_scan"
    func = neuron_scan_kernel(steps, M, dtype, rule, device=imp.snnc_device)
    gv = imp.block_builder.add_func(opaque(func), name)
    bb = imp.block_builder
    flat = _reshape(bb, x, (steps, M))
    args = [flat] if th is None else [flat, relax.const(th.numpy().astype(dtype))]
    s = bb.emit(relax.call_tir(gv, args, relax.TensorType((steps, M), dtype)))
    return _reshape(bb, s, shape)


def fused_scan_ok(mod) -> bool:
    """Whether the fused TIR scan implements this neuron (exact IF / LIF / PLIF types, one output,
    the reset modes and scalar constants the scan knows); other neurons lower from their forward."""
    return (type(mod) in (IF, LIF, ParametricLIF) and mod.reset_mode in ("subtract", "zero")
            and not getattr(mod, "output_membrane", False) and not isinstance(getattr(mod, "decay", 0.0), torch.Tensor))


def _convert_exported(imp, node):
    """Any other snnc op (snntorch's Synaptic, norse's cells, sinabs' multi-spike IAF ...): its
    reference forward, exported by ``torch.export`` with this node's static input shapes and
    imported by TVM's exported-program frontend, becomes one private Relax function called here.
    The T loop is unrolled into elementwise ops (no fused scan), the arithmetic is the reference's
    op for op."""
    from tvm.relax.frontend.torch import from_exported_program
    mod = imp.named_modules[node.target]
    args = [a for a in node.args if isinstance(a, fx.Node)]
    example = tuple(torch.zeros(info(a).shape, dtype=info(a).dtype) for a in args)
    with torch.no_grad():
        ep = torch.export.export(_Forward(mod), example)
    sub = from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True)
    bb = imp.block_builder
    gv = bb.add_func(sub["main"].without_attr("global_symbol"), f"{type(mod).op_name.replace('.', '_')}_fn")
    return bb.emit(relax.Call(gv, [imp.env[a] for a in args]))


class _Forward(nn.Module):
    """A fresh-state copy of an op for export (per-step ops keep no state across the export)."""

    def __init__(self, mod):
        super().__init__()
        import copy
        self.mod = copy.deepcopy(mod).eval()
        if hasattr(self.mod, "reset"):
            self.mod.reset()

    def forward(self, *args):
        return self.mod(*args)


def _convert_readout(imp, node):
    (shape, dtype), x = _seq_shape(node.args[0]), imp.env[node.args[0]]
    steps, M = shape[0], math.prod(shape[1:])
    name = "snn_readout"
    gv = imp.block_builder.add_func(opaque(readout_kernel(steps, M, dtype, device=imp.snnc_device)), name)
    bb = imp.block_builder
    flat = _reshape(bb, x, (steps, M))
    y = bb.emit(relax.call_tir(gv, [flat], relax.TensorType((M,), dtype)))
    return _reshape(bb, y, shape[1:])


def _convert_direct_encoder(imp, node):
    mod, x = imp.named_modules[node.target], imp.env[node.args[0]]
    if mod.step_mode != "m":
        return x
    return imp.block_builder.emit(relax.op.broadcast_to(x, _seq_shape(node)[0]))


def _convert_reshape(imp, node):
    return _reshape(imp.block_builder, imp.env[node.args[0]], _seq_shape(node)[0])


def _convert_batch_norm(imp, node):
    """Inference BN with the running statistics (the frontend's converter emits training=True,
    which legalizes to batch statistics)."""
    mod, x = imp.named_modules[node.target], imp.env[node.args[0]]
    const = imp._convert_torch_tensor_to_relax
    weight = imp.params[mod.weight] if mod.weight is not None else const(torch.ones(mod.num_features))
    bias = imp.params[mod.bias] if mod.bias is not None else const(torch.zeros(mod.num_features))
    out = imp.block_builder.emit(relax.op.nn.batch_norm(
        x, weight, bias, const(mod.running_mean), const(mod.running_var),
        axis=1, epsilon=mod.eps, training=False))
    return imp.block_builder.emit(relax.TupleGetItem(out, 0))


SPIKING_CONVERTERS = {
    IF: _convert_neuron, LIF: _convert_neuron, ParametricLIF: _convert_neuron,
    Readout: _convert_readout, DirectEncoder: _convert_direct_encoder,
    MergeTime: _convert_reshape, SplitTime: _convert_reshape,
}
# standard layers whose frontend converter does not match the reference (inference) semantics
OVERRIDES = {nn.BatchNorm1d: _convert_batch_norm, nn.BatchNorm2d: _convert_batch_norm}


# --- the importer --------------------------------------------------------------------------------

def _importer(device, gm=None):
    imp = TorchFXImporter()
    imp.snnc_device = device
    table = {**SPIKING_CONVERTERS, **OVERRIDES}
    for mod in (gm.modules() if gm is not None else ()):  # snnc ops without a hand-written converter
        if is_snnc_op(mod) and type(mod) not in table and getattr(type(mod), "exportable", isinstance(mod, Neuron)):
            table[type(mod)] = _convert_exported
    imp.update_convert_map({cls: (lambda node, conv=conv: conv(imp, node)) for cls, conv in table.items()})
    return imp


def supported_ops() -> list[str]:
    """Names (as in the IR dump) of every op this lowering handles."""
    imp = _importer("cpu")
    names = {spec.name for cls, spec in MODULE_OPS.items() if cls in imp.convert_map}
    names |= {spec.name for fn, spec in FUNCTION_OPS.items()
              if getattr(fn, "__name__", None) in imp.convert_map}
    names |= {spec.name for m, spec in METHOD_OPS.items() if m in imp.convert_map}
    names |= {cls.op_name for cls in SPIKING_CONVERTERS}
    return sorted(names)


def check_supported(gm: fx.GraphModule, imp=None) -> None:
    """Raise ``UnsupportedOp`` naming the first node the lowering cannot handle."""
    imp = imp or _importer("cpu", gm)
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "call_module":
            ok = type(modules[node.target]) in imp.convert_map
        elif node.op == "call_function":
            ok = getattr(node.target, "__name__", None) in imp.convert_map
        elif node.op == "call_method":
            ok = node.target in imp.convert_map
        else:
            ok = True
        if ok and node.op == "call_module":
            mod = modules[node.target]
            if getattr(mod, "step_mode", "m") != "m" and not isinstance(mod, DirectEncoder):
                raise UnsupportedOp(f"{node_ref(node)}: {op_name(gm, node)} runs per step; the TVM "
                                    f"targets compile multi-step graphs (run unroll_timesteps first)")
        if not ok:
            raise UnsupportedOp(f"{node_ref(node)}: op {op_name(gm, node)} has no TVM lowering; "
                                f"supported: {', '.join(supported_ops())}")


def to_relax(gm: fx.GraphModule, device: str = "cpu") -> tvm.IRModule:
    """The Relax ``IRModule`` of an annotated multi-step graph (``device``: "cpu" or "gpu")."""
    imp = _importer(device, gm)
    check_supported(gm, imp)
    spec = gm.snnc_spec
    input_info = [(tuple(shape), dtype) for shape, dtype in spec["inputs"]]
    return imp.from_fx(gm, input_info, keep_params_as_input=False, unwrap_unit_return_tuple=True,
                       no_bind_return_tuple=False)
