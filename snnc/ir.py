"""The spiking IR: op table, node metadata and the input spec a graph carries.

A spiking-IR graph is a ``torch.fx.GraphModule`` whose leaves are torch.nn layers and
``snnc.ops`` modules. Every node knows its *op name* (``nn.conv2d``, ``snn.lif``, ``add`` ...)
from the table below, and after ``annotate`` every tensor node carries ``node.meta["snnc"]``:

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
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

from .errors import VerifyError, node_ref
from .ops import is_snnc_op

LAYOUTS = ("step", "seq", "flat")


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    shape: tuple
    dtype: torch.dtype
    spiking: bool
    layout: str


@dataclasses.dataclass(frozen=True)
class OpSpec:
    """How the IR sees one op: its name, whether its output carries spikes
    (``"yes"``, ``"no"``, or ``"keep"`` = spiking iff every tensor input is), whether it may see a
    ``[T, N, ...]`` input directly (``time_agnostic``), and its dump attributes."""

    name: str
    spiking: str = "no"
    time_agnostic: bool = True
    attrs: Callable | None = None


def _pair(v):
    if isinstance(v, (tuple, list)):
        return "x".join(str(i) for i in v) if len(set(v)) > 1 else str(v[0])
    return str(v)


def _conv_attrs(m):
    a = {"out": m.out_channels, "kernel": _pair(m.kernel_size), "stride": _pair(m.stride),
         "pad": _pair(m.padding)}
    if m.groups != 1:
        a["groups"] = m.groups
    if any(d != 1 for d in m.dilation):
        a["dilation"] = _pair(m.dilation)
    return a


def _pool_attrs(m):
    return {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride), "pad": _pair(m.padding)}


MODULE_OPS: dict[type, OpSpec] = {
    nn.Conv1d: OpSpec("nn.conv1d", time_agnostic=False, attrs=_conv_attrs),
    nn.Conv2d: OpSpec("nn.conv2d", time_agnostic=False, attrs=_conv_attrs),
    nn.Linear: OpSpec("nn.linear", attrs=lambda m: {"out": m.out_features}),
    nn.BatchNorm1d: OpSpec("nn.batch_norm", time_agnostic=False, attrs=lambda m: {"eps": m.eps}),
    nn.BatchNorm2d: OpSpec("nn.batch_norm", time_agnostic=False, attrs=lambda m: {"eps": m.eps}),
    nn.ReLU: OpSpec("nn.relu"),
    nn.AvgPool2d: OpSpec("nn.avg_pool2d", time_agnostic=False, attrs=_pool_attrs),
    nn.MaxPool2d: OpSpec("nn.max_pool2d", spiking="keep", time_agnostic=False, attrs=_pool_attrs),
    nn.AdaptiveAvgPool2d: OpSpec("nn.adaptive_avg_pool2d", time_agnostic=False,
                                 attrs=lambda m: {"output": _pair(m.output_size)}),
    nn.Flatten: OpSpec("nn.flatten", spiking="keep", time_agnostic=False,
                       attrs=lambda m: {"start_dim": m.start_dim}),
    nn.Dropout: OpSpec("nn.dropout", spiking="keep", attrs=lambda m: {"p": m.p}),
    nn.Identity: OpSpec("nn.identity", spiking="keep"),
}

FUNCTION_OPS: dict[Callable, OpSpec] = {
    operator.add: OpSpec("add"), torch.add: OpSpec("add"),
    operator.mul: OpSpec("mul"), torch.mul: OpSpec("mul"),
    operator.truediv: OpSpec("div"),
    torch.cat: OpSpec("cat", spiking="keep"),
    torch.flatten: OpSpec("flatten", spiking="keep", time_agnostic=False),
    torch.relu: OpSpec("nn.relu"), F.relu: OpSpec("nn.relu"),
    F.avg_pool2d: OpSpec("nn.avg_pool2d", time_agnostic=False),
    F.max_pool2d: OpSpec("nn.max_pool2d", spiking="keep", time_agnostic=False),
    F.adaptive_avg_pool2d: OpSpec("nn.adaptive_avg_pool2d", time_agnostic=False),
    F.dropout: OpSpec("nn.dropout", spiking="keep"),
    operator.getitem: OpSpec("getitem", spiking="keep"),
    getattr: OpSpec("getattr"),
}

METHOD_OPS: dict[str, OpSpec] = {
    "view": OpSpec("view", spiking="keep", time_agnostic=False),
    "reshape": OpSpec("reshape", spiking="keep", time_agnostic=False),
    "flatten": OpSpec("flatten", spiking="keep", time_agnostic=False),
    "size": OpSpec("size"),
    "relu": OpSpec("nn.relu"),
    "add": OpSpec("add"), "mul": OpSpec("mul"),
    "contiguous": OpSpec("contiguous", spiking="keep"),
}


def register_module_op(cls: type, spec: OpSpec) -> None:
    """Teach the IR a torch.nn layer type (snnc ops register themselves via ``op_name``)."""
    MODULE_OPS[cls] = spec


def op_spec(gm: fx.GraphModule, node: fx.Node) -> OpSpec | None:
    """The ``OpSpec`` of a node, or ``None`` if the IR does not know the op."""
    if node.op in ("placeholder", "output", "get_attr"):
        return OpSpec(node.op, spiking="keep")
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if is_snnc_op(mod):
            return OpSpec(type(mod).op_name, spiking=getattr(mod, "spiking_output", _snn_spiking(mod)),
                          attrs=lambda m: m.attrs())
        return MODULE_OPS.get(type(mod))
    if node.op == "call_function":
        return FUNCTION_OPS.get(node.target)
    if node.op == "call_method":
        return METHOD_OPS.get(node.target)
    return None


def _snn_spiking(mod) -> str:
    from .ops import Neuron, PoissonEncoder
    if isinstance(mod, (Neuron, PoissonEncoder)):
        return "yes"
    if type(mod).op_name.startswith("time.") or type(mod).op_name == "snn.direct_encoder":
        return "keep"
    return "no"


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
                kind = spec.spiking if spec else "no"
                spiking = kind == "yes" or (kind == "keep" and bool(tins) and all(i.spiking for i in tins))
                layout = _out_layout(self.module, n, tins)
            n.meta["snnc"] = TensorInfo(tuple(value.shape), value.dtype, spiking, layout)
        else:
            n.meta["snnc"] = value if isinstance(value, (int, float, bool, tuple, list, torch.Size)) else None
        return value


def _tensor_tuple(v) -> bool:
    return isinstance(v, tuple) and bool(v) and all(isinstance(e, torch.Tensor) for e in v)


def _out_layout(gm, node, tins):
    mod = module_of(gm, node)
    name = getattr(type(mod), "op_name", "") if mod is not None else ""
    mode = getattr(mod, "step_mode", "s")
    if getattr(mod, "output_layout", None):  # ops whose output layout is fixed (int.readout: "step")
        return mod.output_layout
    if name == "time.merge":
        return "flat"
    if name == "time.split":
        return "seq"
    if mode == "m" and name in ("snn.direct_encoder", "snn.poisson_encoder"):
        return "seq"
    if mode == "m" and name == "snn.readout":
        return "step"
    return tins[0].layout if tins else "step"


def annotate(gm: fx.GraphModule, example=None, expected: dict | None = None) -> fx.GraphModule:
    """(Re)compute ``node.meta["snnc"]`` for every node, in place; returns ``gm``.

    With ``example`` (a list of tensors) the spec is (re)set from it; otherwise the graph's spec
    gives zero inputs. Neuron and readout state is reset before and after the run. ``expected``
    (node -> TensorInfo) makes any node whose computed shape or dtype differs an error.
    """
    from .runtime import reset
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
    return gm


def info(node: fx.Node) -> TensorInfo | None:
    m = node.meta.get("snnc")
    return m if isinstance(m, TensorInfo) else None


def require_info(node: fx.Node) -> TensorInfo:
    i = info(node)
    if i is None:
        raise VerifyError(f"{node_ref(node)} has no snnc metadata; run snnc.ir.annotate(gm) first")
    return i
