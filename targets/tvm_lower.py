"""Lowering of the unrolled (multi-step) spiking IR to a Relax ``IRModule``.

Standard layers go through TVM's torch frontend (``TorchFXImporter``: conv, linear, BN, pooling,
reshapes, arithmetic); an op whose record (``snnc.ops.registry``) has a ``tvm`` hook other than
``FORWARD`` goes through that converter (the converters below), which the importer consults like
its own table. Each neuron layer becomes ONE
``call_tir`` of the fused scan kernel in ``tvm_kernels.py`` (the T loop inside the kernel), not T
copies of an elementwise update.

Assumes: a multi-step graph (``unroll_timesteps``), neurons in ``step_mode="m"`` on ``[T, N, ...]``.
Guarantees: the Relax function ``main`` takes the graph's inputs (static shapes from
``gm.snnc_spec``) and returns what the graph returns; the semantics are those of
``snnc/ops/neurons.py`` and ``snnc/ops/coding.py`` (tested against ``snnc.run``).
"""
from __future__ import annotations

import math
import types

import torch
import tvm
from torch import fx, nn
from tvm import relax
from tvm.relax.frontend.torch.fx_translator import TorchFXImporter

from snnc.errors import UnsupportedOp, node_ref
from snnc.ir import info
from snnc.ops import registry

from .tvm_kernels import NeuronScan, neuron_scan_kernel, pick_lanes, readout_kernel, state_scan_kernel

OPAQUE = 8  # relay/relax OpPatternKind kOpaque: FuseOps must not merge a hand-scheduled kernel


# --- neuron rule: snnc neuron module -> NeuronScan ------------------------------------------------

class _Constants:
    """The neuron as its ``charge`` sees it, with tensor parameters read as Python floats
    (a trainable ``w`` of PLIF, say); Python floats become constants of the kernel's dtype when
    they meet a TIR expression, rounded as torch rounds a scalar against a tensor."""

    def __init__(self, neuron):
        self._neuron = neuron

    def __getattr__(self, name):
        value = getattr(self._neuron, name)
        if isinstance(value, types.MethodType) and value.__self__ is self._neuron:
            return types.MethodType(value.__func__, self)   # its methods see the constants too
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise UnsupportedOp(f"{type(self._neuron).__name__}.{name} is a tensor of {value.numel()} values; "
                                    "the TVM lowering of charge() takes scalar parameters")
            return float(value.detach().float())
        return value


class _TIRMath:
    """TIR forms of the helpers a neuron's ``update`` may use (torch forms: ``TorchMath``)."""

    def __init__(self, dtype):
        self.dtype = dtype

    def heaviside(self, z, strict):
        one, zero = tvm.tirx.const(1, self.dtype), tvm.tirx.const(0, self.dtype)
        return tvm.tirx.Select(z > zero if strict else z >= zero, one, zero)


def update_rule(neuron, dtype="float32"):
    """``update(x, state) -> (spike, new_state)`` on TIR expressions for a multi-state neuron:
    its own ``update`` method, evaluated on TIR values."""
    view, math_ = _Constants(neuron), _TIRMath(dtype)
    return plain_arithmetic(neuron, lambda x, state: type(neuron).update(view, x, tuple(state), math_))


def plain_arithmetic(neuron, step):
    """``step`` (a neuron update on TIR values) as a rule returning ``(spike, [new state])``; an
    update that is not plain arithmetic (Python branching on a value, a torch-only call) becomes an
    ``UnsupportedOp`` naming the neuron."""
    def rule(*args):
        try:
            s, new = step(*args)
        except UnsupportedOp:
            raise
        except Exception as e:
            raise UnsupportedOp(f"{type(neuron).__name__}.update is not plain arithmetic, so it has no TVM "
                                f"lowering ({type(e).__name__}: {e})") from None
        return s, list(new)
    return rule


def state_kernel(neuron, steps, M, dtype, device, lanes=None):
    """The scan PrimFunc of a neuron with several state variables (its record's ``state``)."""
    init = [float(t.reshape(-1)[0]) for t in neuron.initial_state(torch.zeros(1))]
    return state_scan_kernel(steps, M, dtype, update_rule(neuron, dtype), init, device=device, lanes=lanes)


def multi_state(neuron) -> bool:
    rec = registry.module_record(neuron)
    return rec is not None and len(rec.state) > 1 and "recurrent_scan" not in rec.hooks


def recurrent_scan(mod) -> dict | None:
    """The op's ``recurrent_scan`` hook answer (``snn.rlif``, ``snn.rsynaptic``, ``snn.feedback``:
    neuron, update, init, path), or ``None`` when the op has none or its path has no scan."""
    rec = registry.module_record(mod)
    hook = rec.hooks.get("recurrent_scan") if rec is not None else None
    return None if hook is None else hook(mod)


def _scalar_neuron(n) -> bool:
    """A neuron whose update the TIR scans take: scalar constants, one output."""
    if getattr(n, "report", None) is not None or getattr(n, "output_membrane", False):
        return False
    if hasattr(n, "scalar_params"):
        return n.scalar_params()
    return not any(isinstance(getattr(n, a, None), torch.Tensor) and getattr(n, a).numel() > 1
                   for a in ("v_th", "decay", "v_init"))


def charge_rule(neuron, dtype="float32"):
    """``charge(v, x)`` on TIR expressions: the neuron's own ``charge`` method (the reference
    semantics, plain arithmetic), evaluated on TIR values instead of torch tensors."""
    charge = type(neuron).charge
    view = _Constants(neuron)

    def rule(v, x):
        try:
            return charge(view, v, x)
        except UnsupportedOp:
            raise
        except Exception as e:
            raise UnsupportedOp(f"{type(neuron).__name__}.charge is not plain arithmetic, so it has no TVM "
                                f"lowering ({type(e).__name__}: {e})") from None
    return rule


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
    v_init = neuron.v_init
    if isinstance(v_init, torch.Tensor):
        # a per-channel start membrane (channel-wise conversion with half-threshold start): it rides
        # in the threshold buffer, so both are laid out alike (the threshold expanded if scalar)
        full = [torch.broadcast_to(torch.as_tensor(t, dtype=torch.float32).detach(), tuple(sample_shape))
                for t in (neuron.v_th, v_init)]
        th_layout, init_layout = (threshold_layout(t, sample_shape) for t in full)
        if th_layout[1:] != init_layout[1:]:   # laid out differently: one value per neuron of a sample, both
            th_layout, init_layout = ((t.reshape(-1).contiguous(), t.numel(), 1) for t in full)
        values, size, inner = th_layout
        return NeuronScan(charge_rule(neuron, dtype), v_th="buffer", threshold_size=size, threshold_inner=inner,
                          compare=neuron.compare, reset=neuron.reset_mode, v_reset=neuron.v_reset,
                          v_init="buffer", max_spikes=getattr(neuron, "max_spikes", 1)), \
            torch.cat([values, init_layout[0]])
    layout = threshold_layout(neuron.v_th, sample_shape)
    common = dict(compare=neuron.compare, reset=neuron.reset_mode, v_reset=neuron.v_reset,
                  v_init=v_init, max_spikes=getattr(neuron, "max_spikes", 1))
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


def _dims(x) -> list:
    """The shape of Relax value ``x``: Python ints where static, PrimExprs where symbolic (the
    batch of a module built with ``batch="any"``)."""
    return [int(d) if isinstance(d, tvm.tirx.IntImm) else d for d in x.ty.shape.values]


def _prod(dims):
    out = 1
    for d in dims:
        out = out * d
    return out if isinstance(out, int) else _simplify(out)


def _simplify(e):
    return tvm.sym.Analyzer().simplify(e)


def _convert_neuron(imp, node):
    mod = imp.named_modules[node.target]
    if not fused_scan_ok(mod) or (imp.snnc_device != "cpu" and recurrent_scan(mod) is not None):
        return _convert_exported(imp, node)
    if recurrent_scan(mod) is not None:
        from .tvm_recurrent import convert_recurrent
        return convert_recurrent(imp, node, mod)
    (_, dtype), x = _seq_shape(node), imp.env[node.args[0]]
    shape = _dims(x)  # [T, N, ...]; N may be symbolic (batch="any")
    steps, sample = shape[0], tuple(shape[2:])
    M = _prod(shape[1:])
    name = f"{type(mod).op_name.replace('.', '_')}_scan"
    # a symbolic M: one kernel for every batch, its chunks must not straddle samples
    static, lanes = isinstance(M, int), pick_lanes(math.prod(sample))
    if multi_state(mod):
        func, th = state_kernel(mod, steps, M if static else None, dtype, imp.snnc_device,
                                lanes=None if static else lanes), None
    else:
        rule, th = neuron_scan(mod, sample, dtype)
        func = neuron_scan_kernel(steps, M if static else None, dtype, rule, device=imp.snnc_device,
                                  lanes=None if static else lanes)
    gv = imp.block_builder.add_func(opaque(func), name)
    bb = imp.block_builder
    flat = _reshape(bb, x, (steps, M))
    args = [flat] if th is None else [flat, relax.const(th.numpy().astype(dtype))]
    s = bb.emit(relax.call_tir(gv, args, relax.TensorType((steps, M), dtype)))
    return _reshape(bb, s, shape)


def fused_scan_ok(mod) -> bool:
    """Whether a fused TIR scan implements this neuron: one output (spikes), a reset mode the
    scan knows, scalar constants; recurrent ops (``recurrent_scan`` hook) with a linear or
    elementwise path. Others (a LIF reporting its membrane, with per-neuron decay or
    reset="none", per-neuron snntorch parameters, a reported state, the peers' StateNeurons) lower
    from their exported forward."""
    from snnc.ops import StateNeuron
    rec = registry.module_record(mod)
    if rec is not None and "recurrent_scan" in rec.hooks:
        scan = recurrent_scan(mod)
        return scan is not None and _scalar_neuron(mod) and _scalar_neuron(scan["neuron"]) \
            and getattr(scan["neuron"], "reset_mode", "zero") in ("subtract", "zero", "subtract_after_leak",
                                                                  "zero_after_leak", "none")
    if multi_state(mod):   # update(x, state, math) in plain arithmetic (not the StateNeurons' own loops)
        from snnc.ops import MultiStateNeuron
        return isinstance(mod, MultiStateNeuron) and _scalar_neuron(mod)
    return (not isinstance(mod, StateNeuron) and not getattr(mod, "output_membrane", False)
            and getattr(mod, "reset_mode", "subtract") != "none"
            and not isinstance(getattr(mod, "decay", 0.0), torch.Tensor))


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
    (_, dtype), x = _seq_shape(node.args[0]), imp.env[node.args[0]]
    shape = _dims(x)
    steps, M = shape[0], _prod(shape[1:])
    name = "snn_readout"
    if isinstance(M, int):
        func = readout_kernel(steps, M, dtype, device=imp.snnc_device)
    else:
        func = readout_kernel(steps, None, dtype, device=imp.snnc_device, lanes=pick_lanes(math.prod(shape[2:])))
    gv = imp.block_builder.add_func(opaque(func), name)
    bb = imp.block_builder
    flat = _reshape(bb, x, (steps, M))
    y = bb.emit(relax.call_tir(gv, [flat], relax.TensorType((M,), dtype)))
    return _reshape(bb, y, shape[1:])


def _convert_direct_encoder(imp, node):
    mod, x = imp.named_modules[node.target], imp.env[node.args[0]]
    if mod.step_mode != "m":
        return x
    steps = _seq_shape(node)[0][0]
    return imp.block_builder.emit(relax.op.broadcast_to(x, [steps, *_dims(x)]))


def _convert_reshape(imp, node):
    """MergeTime ``[T, N, ...] -> [T*N, ...]`` and SplitTime back, from the input's (possibly
    symbolic) shape; the traced output shape only supplies T."""
    x, out = imp.env[node.args[0]], _seq_shape(node)[0]
    shape = _dims(x)
    if all(isinstance(d, int) for d in shape):
        return _reshape(imp.block_builder, x, out)
    if len(out) == len(shape) - 1:  # merge the two leading dims
        new = [_simplify(shape[0] * shape[1]), *shape[2:]]
    else:                           # split the leading dim into T and N
        new = [out[0], _simplify(shape[0] // out[0]), *shape[1:]]
    return _reshape(imp.block_builder, x, new)


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


# --- the importer --------------------------------------------------------------------------------

def _importer(device, gm=None, spike_convs="fp32"):
    """TVM's torch importer with snnc's converters for the graph's ops whose ``tvm`` hook is one
    (ops whose hook is ``FORWARD`` keep the frontend's own converter); ``spike_convs`` other than
    "fp32": convs on spikes become int8 kernels of that ISA (``tvm_spike_conv``)."""
    imp = TorchFXImporter()
    imp.snnc_device = device
    if gm is not None:
        convs = {}
        for m in gm.modules():
            rec = registry.module_record(m)
            h = rec.hooks.get("tvm") if rec is not None else None
            if h is not None and h != registry.FORWARD:
                convs[type(m)] = registry.resolve(h)
        for n in gm.graph.nodes:   # functions / methods: the importer keys them by name
            if n.op in ("call_function", "call_method"):
                rec = registry.lookup(gm, n)
                h = rec.hooks.get("tvm") if rec is not None else None
                if h is not None and h != registry.FORWARD:
                    convs[n.target if n.op == "call_method" else n.target.__name__] = registry.resolve(h)
        imp.update_convert_map({cls: (lambda node, conv=conv: conv(imp, node)) for cls, conv in convs.items()})
        from .tvm_spike_conv import install
        install(imp, gm, spike_convs)
    return imp


def supported_ops() -> list[str]:
    """Names (as in the IR dump) of every op this lowering handles: those with a ``tvm`` hook."""
    return registry.supported("tvm")


def check_supported(gm: fx.GraphModule, imp=None) -> None:
    """Raise ``UnsupportedOp`` naming the first node the lowering cannot handle."""
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        rec = registry.lookup(gm, node)
        if not registry.has_hook(rec, "tvm"):
            raise UnsupportedOp(registry.unsupported_message(gm, node, "tvm"))
        if node.op == "call_module":
            mod = gm.get_submodule(node.target)
            if getattr(mod, "step_mode", "m") != "m" and rec.over_time != "encode":
                raise UnsupportedOp(f"{node_ref(node)}: {rec.name} runs per step; the TVM "
                                    f"targets compile multi-step graphs (run unroll_timesteps first)")


def to_relax(gm: fx.GraphModule, device: str = "cpu", batch: str = "static",
             spike_convs: str = "fp32") -> tvm.IRModule:
    """The Relax ``IRModule`` of an annotated multi-step graph (``device``: "cpu" or "gpu").
    ``batch="any"``: the batch dimension of every input is the symbolic ``n`` (one library
    for every batch size); ``"static"``: the traced batch. ``spike_convs``: "fp32", or the int8
    kernel ISA ("vnni", "avx512bw") for convs whose input is spikes (``tvm_spike_conv``)."""
    check_supported(gm)
    imp = _importer(device, gm, spike_convs)
    spec = gm.snnc_spec
    input_info = [(tuple(shape), dtype) for shape, dtype in spec["inputs"]]
    if batch == "any":
        n, bdim = tvm.tirx.Var("n", "int64"), 1 if spec["layout"] == "seq" else 0
        input_info = [(shape[:bdim] + (n,) + shape[bdim + 1:], dtype) for shape, dtype in input_info]
    return imp.from_fx(gm, input_info, keep_params_as_input=False, unwrap_unit_return_tuple=True,
                       no_bind_return_tuple=False)
