"""The op registry: every op of the spiking IR is ONE record, registered by the op's own module.

A record says, in one place, what the IR and every stage need to know about an op:

    name        as printed in the IR dump (``nn.conv2d``, ``snn.lif``, ``add``)
    matches     module classes (subclasses match too), call_function targets, call_method names
    spiking     "yes" | "no" | "keep" (spiking iff every tensor input is); or a function of the module
    time        ``time_agnostic``: may see ``[T, N, ...]`` directly (elementwise ops); otherwise the
                unroll pass merges time into the batch first. ``accepts(mod)``: the input layouts the
                op requires (a multi-step neuron: ``{"seq"}``); ``layout(mod, in_layout)``: the
                output layout ("step" ``[N, ...]``, "seq" ``[T, N, ...]``, "flat" ``[T*N, ...]``)
    over_time   "loop" (multi-step form loops over T: neurons, readouts), "encode" (encoders), ""
    state       ``()`` for stateless ops, else the names of the state variables carried over time
                (a LIF: ``("v",)``; an adaptive LIF: ``("v", "a")``)
    attrs       ``attrs(module) -> dict`` shown in the dump
    shape       ``shape(module, [(shape, dtype), ...]) -> (shape, dtype)`` without running the op
                (stateful ops need one; stateless ops may leave it to fake-tensor execution)
    node_layout ``(node, [input TensorInfo], value, T) -> layout`` for ops whose output layout depends
                on their arguments (``x.mean(0)`` removes time, ``x.mean(1)`` keeps it); overrides ``layout``
    seq_form    ``(graph, node, args, kwargs, T) -> new node``: how ``unroll_timesteps`` runs an op that
                names dims on ``[T, N, ...]`` (its dims shifted past time) instead of the merged batch
    hooks       stage -> hook. A hook is a callable, a lazy ``"package.module:function"`` reference
                (resolved on first use, so importing ``snnc.ops`` never imports tvm), or
                ``FORWARD``: the stage exports the reference forward itself (ONNX traces it)

Stages ask the registry (``lookup``, ``hook``, ``supported``) instead of matching names or
classes; a stage without a hook for an op raises ``UnsupportedOp`` naming the node, the op and
the stages that do support it. This follows TVM's op registry (attributes registered once per op)
and tinygrad's rules-as-data.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from ..errors import UnsupportedOp, node_ref

FORWARD = "forward"   # hook value: the stage runs / exports the op's reference forward
STAGES = ("onnx", "tvm", "tvm:int", "nir_out", "fused_scan")


def _first(mod, layouts):
    return layouts[0] if layouts else "step"


@dataclasses.dataclass(frozen=True)
class OpRecord:
    name: str
    modules: tuple = ()
    functions: tuple = ()
    methods: tuple = ()
    spiking: str | Callable = "no"
    time_agnostic: bool = True
    accepts: Callable | None = None      # mod -> set of input layouts it requires, or None
    layout: Callable = _first            # (mod, [input layouts]) -> output layout
    state: tuple = ()
    over_time: str = ""                  # "loop": loops over T itself when multi-step (neurons,
                                         # readouts, NeuNorm); "encode": makes time from a static input
    attrs: Callable | None = None
    shape: Callable | None = None        # (mod, [(shape, dtype) of tensor inputs]) -> (shape, dtype);
                                         # None: the op runs on fake tensors to find out
    node_layout: Callable | None = None  # (node, [input TensorInfo], value, T) -> output layout
    seq_form: Callable | None = None     # (graph, node, args, kwargs, T) -> the op on [T, N, ...] inputs
    hooks: dict = dataclasses.field(default_factory=dict)
    refused: dict = dataclasses.field(default_factory=dict)   # stage -> why it has no hook

    def spiking_of(self, mod=None) -> str:
        return self.spiking(mod) if callable(self.spiking) else self.spiking

    def stages(self) -> list[str]:
        return sorted(self.hooks)


_BY_NAME: dict[str, OpRecord] = {}
_BY_MODULE: dict[type, OpRecord] = {}
_BY_FUNCTION: dict = {}
_BY_METHOD: dict[str, OpRecord] = {}
_GRAPH = {"placeholder": OpRecord("placeholder", spiking="keep"),
          "output": OpRecord("output", spiking="keep"),
          "get_attr": OpRecord("get_attr", spiking="keep")}


def register(record: OpRecord) -> OpRecord:
    """Add ``record`` (or replace the record of the same name: a module re-imported, or a
    front end refining an op); every class, function and method it matches points to it."""
    if record.name in _BY_NAME:
        unregister(record.name)
    _BY_NAME[record.name] = record
    for cls in record.modules:
        _BY_MODULE[cls] = record
    for fn in record.functions:
        _BY_FUNCTION[fn] = record
    for m in record.methods:
        _BY_METHOD[m] = record
    return record


def register_op(cls, **fields) -> OpRecord:
    """Register the snnc op class ``cls``: named by ``cls.op_name``, dump attributes from its
    ``attrs()``, spiking flag from ``cls.spiking_output`` unless given."""
    fields.setdefault("spiking", getattr(cls, "spiking_output", "no"))
    return register(OpRecord(cls.op_name, modules=(cls,), attrs=lambda m: m.attrs(), **fields))


def same_as_input(mod, ins):
    """Shape rule of elementwise ops (neurons): shaped like the first input."""
    return ins[0]


def seq_when_multi_step(mod):
    """``accepts`` of ops that loop over time themselves in ``step_mode="m"``: ``[T, N, ...]`` only."""
    return {"seq"} if getattr(mod, "step_mode", None) == "m" else None


def unregister(name: str) -> None:
    """Remove the record ``name`` (a test's temporary op, a front end replacing its ops)."""
    old = _BY_NAME.pop(name)
    for table, keys in ((_BY_MODULE, old.modules), (_BY_FUNCTION, old.functions), (_BY_METHOD, old.methods)):
        for k in keys:
            if table.get(k) is old:
                del table[k]


def add_hook(name: str, stage: str, hook) -> None:
    """Give the op ``name`` a hook for ``stage`` (how a new target registers its lowerings)."""
    rec = _BY_NAME[name]
    register(dataclasses.replace(rec, hooks={**rec.hooks, stage: hook}))


def record(name: str) -> OpRecord:
    return _BY_NAME[name]


def records() -> list[OpRecord]:
    return [_BY_NAME[n] for n in sorted(_BY_NAME)]


def module_class_record(cls) -> OpRecord | None:
    """The record registered for exactly ``cls`` (no base-class search)."""
    return _BY_MODULE.get(cls)


def module_record(mod) -> OpRecord | None:
    """The record of a module instance: its class or the nearest registered base class. An
    unregistered class that declares ``op_name`` and ``attrs`` (a user's own leaf op) gets a
    plain record: known to the IR, runnable in torch, lowered by no other stage."""
    rec = _BY_MODULE.get(type(mod))
    if rec is not None:
        return rec
    if not hasattr(type(mod), "op_name"):  # a subclass of a torch layer may redefine forward: unknown
        return None
    for cls in type(mod).__mro__[1:]:
        rec = _BY_MODULE.get(cls)
        if rec is not None:
            name = getattr(type(mod), "op_name", rec.name)
            if name != rec.name:  # a subclass that renamed itself: its base's rules, none of its lowerings
                return dataclasses.replace(rec, name=name, modules=(), hooks={}, refused={})
            return rec
    if hasattr(type(mod), "op_name") and hasattr(mod, "attrs"):
        return OpRecord(type(mod).op_name, spiking=getattr(type(mod), "spiking_output", "no"),
                        attrs=lambda m: m.attrs())
    return None


def lookup(gm, node) -> OpRecord | None:
    """The record of an fx node of ``gm``, or ``None`` when the IR does not know the op."""
    if node.op in _GRAPH:
        return _GRAPH[node.op]
    if node.op == "call_module":
        return module_record(gm.get_submodule(node.target))
    if node.op == "call_function":
        try:
            return _BY_FUNCTION.get(node.target)
        except TypeError:   # an unhashable target
            return None
    if node.op == "call_method":
        return _BY_METHOD.get(node.target)
    return None


def resolve(h):
    """A hook itself: a lazy ``"module:function"`` reference imported on first use."""
    if isinstance(h, str) and ":" in h:
        module, attr = h.split(":")
        return getattr(importlib.import_module(module), attr)
    return h


def has_hook(rec: OpRecord | None, stage: str) -> bool:
    return rec is not None and stage in rec.hooks


def hook(gm, node, stage: str):
    """The ``stage`` hook of ``node``'s op; ``UnsupportedOp`` naming the node, the op and the
    stages that do support it when there is none."""
    rec = lookup(gm, node)
    if rec is None:
        what = type(gm.get_submodule(node.target)).__name__ if node.op == "call_module" else \
            getattr(node.target, "__name__", node.target)
        raise UnsupportedOp(f"{node_ref(node)}: op {what} is not part of the spiking IR; supported: "
                            + ", ".join(supported()))
    if stage not in rec.hooks:
        raise UnsupportedOp(unsupported_message(gm, node, stage))
    return resolve(rec.hooks[stage])


def supported(stage: str | None = None) -> list[str]:
    """Names of the ops the IR knows (``stage=None``) or that have a ``stage`` hook."""
    return sorted(n for n, r in _BY_NAME.items() if stage is None or stage in r.hooks)


def unsupported_message(gm, node, stage: str, why: str = "") -> str:
    rec = lookup(gm, node)
    name = rec.name if rec else getattr(node.target, "__name__", node.target)
    if not why and rec is not None and stage in rec.refused:
        why = f" ({rec.refused[stage]})"
    runs_on = ", ".join(["torch"] + (rec.stages() if rec else []))
    return (f"{node_ref(node)}: op {name} has no {stage} lowering{why}; supported: "
            + ", ".join(supported(stage)) + f"; {name} runs on: {runs_on}")
