"""The spiking IR: node metadata, the input spec a graph carries, and its calling convention.

A spiking-IR graph is a ``torch.fx.GraphModule`` whose leaves are torch.nn layers and
``snnc.ops`` modules. Every node knows its *op name* (``nn.conv2d``, ``snn.lif``, ``add`` ...)
from its op record (``snnc.ops.registry``), and after ``annotate`` every tensor node carries
``node.meta["snnc"]``:

    TensorInfo(shape, dtype, spiking, layout)

``layout`` is the time layout of the value: ``"step"`` = ``[N, ...]`` (one time step, or a value
without time such as an ANN activation or a readout), ``"seq"`` = ``[T, N, ...]``, ``"flat"`` =
``[T*N, ...]`` (time merged into the batch for stateless layers).

The graph's example-input spec lives in ``gm.snnc_spec`` (a plain attribute, so it survives
``torch.save``; fx drops ``node.meta`` when pickling, so metadata is recomputed from the spec).
"""
from __future__ import annotations

import dataclasses
import operator

import torch
from torch import fx

from .errors import InputError, VerifyError, node_ref
from .ops import registry, reset
from .ops.registry import OpRecord

LAYOUTS = ("step", "seq", "flat")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: torch.dtype
    spiking: bool
    layout: str


# How the IR sees an op (name, spiking flag, time rule, dump attributes, stage hooks) is its record
# in ``snnc.ops.registry``; ``op_spec`` is the record of a node.
OpSpec = OpRecord


def op_spec(gm: fx.GraphModule, node: fx.Node) -> OpRecord | None:
    """The op record of a node, or ``None`` if the IR does not know the op."""
    return registry.lookup(gm, node)


def op_name(gm: fx.GraphModule, node: fx.Node) -> str:
    spec = op_spec(gm, node)
    if spec is not None:
        return spec.name
    if node.op == "call_module":
        return f"unknown module {type(gm.get_submodule(node.target)).__name__}"
    return f"unknown {node.op} {getattr(node.target, '__name__', node.target)}"


def module_of(gm: fx.GraphModule, node: fx.Node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


# --- input spec and annotation ----------------------------------------------------------------

def make_spec(example_inputs, layout="step", T=None) -> dict:
    return {"inputs": [(tuple(x.shape), str(x.dtype).replace("torch.", "")) for x in example_inputs],
            "layout": layout, "T": T}


def example_inputs(gm: fx.GraphModule, batch: int | None = None) -> list[torch.Tensor]:
    """Zero tensors matching the graph's input spec (optionally with another batch size)."""
    spec = graph_spec(gm)
    out = []
    for shape, dtype in spec["inputs"]:
        shape = list(shape)
        if batch is not None:
            shape[1 if spec["layout"] == "seq" else 0] = batch
        out.append(torch.zeros(shape, dtype=getattr(torch, dtype)))
    return out


def graph_spec(gm: fx.GraphModule) -> dict:
    spec = getattr(gm, "snnc_spec", None)
    if spec is None:
        raise VerifyError("graph has no input spec (gm.snnc_spec): create it with snnc.trace(model, "
                          "example_inputs), or call snnc.ir.annotate(gm, example_inputs)")
    return spec


class _Annotator(fx.Interpreter):
    """Runs the graph once on example inputs and records shape, dtype, spiking and layout."""

    def run_node(self, n):
        try:
            value = super().run_node(n)
        except Exception as e:  # name the node instead of surfacing a deep torch traceback
            shapes = [list(info(a).shape) for a in n.all_input_nodes if info(a) is not None]
            msg = str(e).split("\n\n")[0]
            raise VerifyError(f"{node_ref(n)} failed on inputs of shapes {shapes}: {type(e).__name__}: {msg}") from None
        old = self.expected.get(n)
        if isinstance(old, TensorInfo) and isinstance(value, torch.Tensor) and \
                (old.shape, old.dtype) != (tuple(value.shape), value.dtype):
            raise VerifyError(f"{node_ref(n)}: metadata says {old.dtype}{list(old.shape)} but the graph "
                              f"computes {value.dtype}{list(value.shape)}; the last pass left stale metadata")
        spec = op_spec(self.module, n)
        if _tensor_tuple(value) and n.op == "call_module":  # a multi-output op, e.g. (spikes, membrane)
            ins = [a.meta.get("snnc") for a in n.all_input_nodes if a.op != "get_attr"]
            tins = [i for i in ins if isinstance(i, TensorInfo)]
            layout = _out_layout(self.module, n, tins)
            spiking = bool(spec) and spec.spiking == "yes"
            n.meta["snnc"] = tuple(TensorInfo(tuple(v.shape), v.dtype, spiking and i == 0, layout)
                                   for i, v in enumerate(value))
            return value
        if isinstance(value, torch.Tensor):
            # get_attr constants broadcast against any layout: they do not decide the node's layout
            ins = [a.meta.get("snnc") for a in n.all_input_nodes if a.op != "get_attr"]
            if n.target is operator.getitem and isinstance(ins[0], tuple) and isinstance(n.args[1], int):
                ins = [ins[0][n.args[1]]]  # one output of a multi-output op
            tins = [i for i in ins if isinstance(i, TensorInfo)]
            if n.op == "placeholder":
                spiking, layout = False, self.input_layout
            else:
                kind = spec.spiking_of(module_of(self.module, n)) if spec else "no"
                spiking = kind == "yes" or (kind == "keep" and bool(tins) and all(i.spiking for i in tins))
                layout = _out_layout(self.module, n, tins, value, graph_spec(self.module).get("T"))
            n.meta["snnc"] = TensorInfo(tuple(value.shape), value.dtype, spiking, layout)
        else:
            n.meta["snnc"] = value if isinstance(value, (int, float, bool, tuple, list, torch.Size)) else None
        return value


def _tensor_tuple(v) -> bool:
    return isinstance(v, tuple) and bool(v) and all(isinstance(e, torch.Tensor) for e in v)


def _out_layout(gm, node, tins, value=None, T=None):
    rec = registry.lookup(gm, node)
    layouts = [i.layout for i in tins]
    if rec is None:
        return layouts[0] if layouts else "step"
    if rec.node_layout is not None:
        return rec.node_layout(node, tins, value, T)
    return rec.layout(module_of(gm, node), layouts)


def annotate(gm: fx.GraphModule, example=None, expected: dict | None = None) -> fx.GraphModule:
    """(Re)compute ``node.meta["snnc"]`` for every node, in place; returns ``gm``.

    With ``example`` (a list of tensors) the spec is (re)set from it; otherwise the graph's spec
    gives zero inputs. Neuron and readout state is reset before and after the run. ``expected``
    (node -> TensorInfo) makes any node whose computed shape or dtype differs an error.
    """
    if example is not None:
        old = getattr(gm, "snnc_spec", None) or {}
        gm.snnc_spec = make_spec(example, layout=old.get("layout", "step"), T=old.get("T"))
    spec = graph_spec(gm)
    inputs = example if example is not None else example_inputs(gm)
    annot = _Annotator(gm)
    annot.input_layout = spec["layout"]
    annot.expected = expected or {}
    reset(gm)
    with torch.no_grad():
        annot.run(*inputs)
    reset(gm)
    gm._snnc_meta_key = _fingerprint(gm)
    install_call_check(gm)
    return gm


# --- the calling convention -------------------------------------------------------------------
# A per-step graph (layout "step", no T) takes ONE time step [N, ...] per call and keeps neuron
# state between calls; a multi-step graph (after unroll_timesteps) takes the whole [T, N, ...]
# sequence for the T it was unrolled for (or, when it encodes time itself, one static [N, ...]).
# Calling a graph with another layout is refused instead of being reinterpreted.

def _shape_words(layout, T):
    return {"seq": f"[T={T}, N, ...]", "step": "[N, ...]"}[layout]


def check_call(gm: fx.GraphModule, inputs) -> None:
    """Raise ``InputError`` when ``inputs`` do not follow ``gm``'s calling convention, naming the
    expected and the given shape and what to call instead."""
    spec = getattr(gm, "snnc_spec", None)
    if not spec or not spec.get("inputs"):
        return
    T, layout = spec.get("T"), spec["layout"]
    for i, (x, (want, _)) in enumerate(zip(inputs, spec["inputs"])):
        if not isinstance(x, torch.Tensor):
            continue
        got, rank = list(x.shape), len(want)
        if layout == "step" and T is None and x.dim() == rank + 1 and _has_state(gm):
            raise InputError(
                f"input {i}: this graph runs one time step per call and expects shape {list(want)} "
                f"([N, ...]); got {got}, a [T, N, ...] sequence of {got[0]} steps? Run it with "
                f"snnc.run(g, x, T={got[0]}), or make the multi-step graph with unroll_timesteps(g, T={got[0]})")
        if layout == "step" and T is not None and x.dim() == rank + 1:
            raise InputError(f"input {i}: this graph encodes its T={T} time steps itself and expects one "
                             f"static input of shape {list(want)} ([N, ...]); got {got}")
        if layout == "seq" and (x.dim() != rank or (T is not None and got[0] != T)):
            raise InputError(f"input {i}: this multi-step graph was unrolled for T={T} and expects shape "
                             f"{list(want)} ({_shape_words(layout, T)}); got {got}"
                             + (f"; unroll the per-step graph again with T={got[0]}" if x.dim() == rank else ""))


def _has_state(gm) -> bool:
    return any(getattr(registry.module_record(m), "state", ()) for m in gm.modules())


def _call_check_hook(module, args):
    check_call(module, args)


def install_call_check(gm: fx.GraphModule) -> None:
    """Make ``gm(...)`` check its calling convention (a forward pre-hook; idempotent)."""
    if _call_check_hook not in gm._forward_pre_hooks.values():
        gm.register_forward_pre_hook(_call_check_hook)


def _fingerprint(gm: fx.GraphModule):
    """What the metadata depends on: the code, the input spec, every module's configuration and
    every parameter's shape and dtype (not values: they change no shape)."""
    mods = tuple((name, type(m).__name__, m.extra_repr()) for name, m in gm.named_modules())
    tensors = tuple((name, tuple(t.shape), t.dtype) for name, t in
                    list(gm.named_parameters()) + list(gm.named_buffers()))
    return (str(gm.graph), repr(getattr(gm, "snnc_spec", None)), mods, tensors)


def metadata_is_current(gm: fx.GraphModule) -> bool:
    """True when ``annotate`` ran on ``gm`` as it is now (so its metadata needs no re-run)."""
    key = getattr(gm, "_snnc_meta_key", None)
    return (key is not None and all("snnc" in n.meta for n in gm.graph.nodes)
            and key == _fingerprint(gm))


def info(node: fx.Node) -> TensorInfo | None:
    m = node.meta.get("snnc")
    return m if isinstance(m, TensorInfo) else None


def require_info(node: fx.Node) -> TensorInfo:
    i = info(node)
    if i is None:
        raise VerifyError(f"{node_ref(node)} has no snnc metadata; run snnc.ir.annotate(gm) first")
    return i
