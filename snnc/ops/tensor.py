"""Records of the tensor ops that real forwards use between layers: reshapes, reductions, joins,
slicing, elementwise functions.

Their semantics are torch's own (the reference runs the op itself; ONNX and TVM's torch frontend
export it). What the records add is time: an op that takes dims must know where the time axis
is. Two rules, both here, one per op:

* ``node_layout`` (the IR's annotation): what the op does to dim 0 of a ``[T, N, ...]`` value.
  ``x.mean(0)`` or ``x[-1]`` removes time (``seq`` -> ``step``), ``x.flatten(0, 1)`` merges it
  into the batch (``seq`` -> ``flat``), ``x.view(T, N, ...)`` splits a ``flat`` value back
  (``flat`` -> ``seq``); an op that leaves dim 0 alone keeps the layout. A value without time
  (``step``) stays one: making time (``x.unsqueeze(0).repeat(T, ...)``) is the front ends'
  encoder idiom, not a guess here.
* ``seq_form`` (``unroll_timesteps``): the per-step op, written for ``[N, ...]``, rewritten to
  run once on ``[T, N, ...]``: every non-negative dim argument moves one place right (negative
  dims count from the end and stay), ``view``/``reshape``/``repeat``/``expand``/``permute``/
  indexing get a leading entry for time, ``x.size()``/``x.shape`` report the per-step sizes.
  Without it an op that names dim 0 (``cat(dim=0)``, ``x[:, 1]``, ``view(N, -1)``) would read
  the merged ``[T*N, ...]`` batch as its batch and mix steps.
"""
from __future__ import annotations

import operator

import torch
from torch import fx
import torch.nn.functional as F
from torch import nn

from .registry import FORWARD, OpRecord, register

_BOTH = {"onnx": FORWARD, "tvm": FORWARD}
_VIEW = {**_BOTH, "tvm:int": "snnc.targets.tvm_int_lower:_emit_view"}


# --- argument access -------------------------------------------------------------------------------

def _get(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _put(args, kwargs, i, name, value):
    args, kwargs = list(args), dict(kwargs)
    if len(args) > i:
        args[i] = value
    else:
        kwargs[name] = value
    return tuple(args), kwargs


def _varargs(args, start):
    """``x.view(a, b)`` and ``x.view((a, b))``: the sizes as one tuple."""
    rest = args[start:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
        return tuple(rest[0])
    return tuple(rest)


def _shift(d):
    """A per-step dim on ``[T, N, ...]``: non-negative dims move past time, negative ones stay."""
    return d + 1 if isinstance(d, int) and d >= 0 else d


def _norm(d, rank):
    return d + rank if isinstance(d, int) and d < 0 else d


def _rank(node):
    m = node.meta.get("snnc")
    return len(m.shape) if hasattr(m, "shape") else None


# --- dim-0 fate: what an op does to the leading axis of its input ---------------------------------
# "keep" (dim 0 is still dim 0), "drop" (removed), "merge" (dim 0 and 1 become one), "other".

def _fate_dim(node, idx, name, default, rank, insert=False):
    d = _get(node.args, node.kwargs, idx, name, default)
    if d is None:   # squeeze(): removes dim 0 only when it has size 1
        shape = getattr(node.args[0].meta.get("snnc"), "shape", (1,))
        return "other" if shape[0] == 1 else "keep"
    ds = d if isinstance(d, (tuple, list)) else (d,)
    r = rank + 1 if insert else rank
    return "other" if 0 in [_norm(x, r) for x in ds] else "keep"


def _fate_reduce(node, rank):
    dim = _get(node.args, node.kwargs, 1, "dim")
    if dim is None:
        return "other"
    ds = dim if isinstance(dim, (tuple, list)) else (dim,)
    return "drop" if 0 in [_norm(x, rank) for x in ds] else "keep"


def _fate_flatten(node, rank):
    start = _norm(_get(node.args, node.kwargs, 1, "start_dim", 0), rank)
    end = _norm(_get(node.args, node.kwargs, 2, "end_dim", -1), rank)
    if start != 0:
        return "keep"
    return "merge" if end == 1 else "other"


def _fate_permute(node, rank):
    dims = _varargs(node.args, 1) or tuple(node.kwargs.get("dims", ()))
    return "keep" if dims and _norm(dims[0], rank) == 0 else "other"


def _fate_transpose(node, rank):
    a, b = _get(node.args, node.kwargs, 1, "dim0"), _get(node.args, node.kwargs, 2, "dim1")
    return "other" if 0 in (_norm(a, rank), _norm(b, rank)) and _norm(a, rank) != _norm(b, rank) else "keep"


def _of_multi_output(node) -> bool:
    """``getitem`` picking one output of a multi-output op (a neuron's ``(spikes, membrane)``):
    a plain selection, not a tensor index."""
    src = node.args[0]
    return isinstance(src, fx.Node) and isinstance(src.meta.get("snnc"), tuple)


def _fate_getitem(node, rank):
    if _of_multi_output(node):
        return "keep"
    idx = node.args[1]
    idx = idx if isinstance(idx, tuple) else (idx,)
    if not idx or idx[0] is Ellipsis or isinstance(idx[0], slice):
        return "keep"   # a slice of time (x[1:]) keeps time, with fewer steps
    if isinstance(idx[0], int):
        return "drop"
    return "other"


def _fate_repeat(node, rank):
    sizes = _varargs(node.args, 1)
    return "keep" if len(sizes) == rank and sizes[0] == 1 else "other"


def _fate_expand(node, rank):
    sizes = _varargs(node.args, 1)
    return "keep" if len(sizes) == rank and sizes[0] in (-1,) else "other"


def _layout_rule(fate):
    """``node_layout`` from a fate function; reshapes decide from the shapes instead."""
    def rule(node, ins, value, T):
        layouts = [i.layout for i in ins]
        if not layouts or layouts[0] == "step" or getattr(value, "shape", None) is None:
            return layouts[0] if layouts else "step"
        f = fate(node, len(ins[0].shape))
        if f == "keep":
            return layouts[0]
        if f == "merge" and layouts[0] == "seq":
            return "flat"
        return "step"
    return rule


def _stack_layout(node, ins, value, T):
    """``torch.stack(steps)`` of T per-step values along dim 0, in a graph over T steps (a list
    built in a loop over ``x[t]``), is a ``[T, N, ...]`` sequence; otherwise as for other dim ops."""
    tensors = node.args[0] if node.args else node.kwargs.get("tensors", ())
    dim = _get(node.args, node.kwargs, 1, "dim", 0)
    if T and ins and all(i.layout == "step" for i in ins) and len(tensors) == T and \
            _norm(dim, len(ins[0].shape) + 1) == 0:
        return "seq"
    return _layout_rule(lambda n, r: _fate_dim(n, 1, "dim", 0, r, insert=True))(node, ins, value, T)


def _reshape_layout(node, ins, value, T):
    if not ins or getattr(value, "shape", None) is None:
        return ins[0].layout if ins else "step"
    src, out = ins[0], tuple(value.shape)
    if src.layout == "seq" and len(src.shape) >= 2:
        if out[:2] == tuple(src.shape[:2]):
            return "seq"
        if out and out[0] == src.shape[0] * src.shape[1]:
            return "flat"
        return "step"
    if src.layout == "flat":
        if T and len(out) >= 2 and out[0] == T and out[0] * out[1] == src.shape[0]:
            return "seq"
        return "flat" if out and out[0] == src.shape[0] else "step"
    return src.layout


# --- seq forms: the per-step op rewritten for [T, N, ...] ------------------------------------------

def _emit(graph, node, args, kwargs):
    return graph.create_node(node.op, node.target, tuple(args), dict(kwargs))


def _seq_dim(idx, name, default=None, all_ones=False):
    def form(graph, node, args, kwargs, T):
        d = _get(args, kwargs, idx, name, default)
        if d is None and all_ones:   # squeeze(): every size-1 dim of the step, never time
            shape = node.args[0].meta["snnc"].shape
            d = tuple(i for i, s in enumerate(shape) if s == 1)
            if not d:   # nothing to squeeze (an empty dim tuple would export as a bare view)
                return args[0]
        if d is not None:
            d = tuple(_shift(x) for x in d) if isinstance(d, (tuple, list)) else _shift(d)
            args, kwargs = _put(args, kwargs, idx, name, d)
        return _emit(graph, node, args, kwargs)
    return form


def _seq_reduce(graph, node, args, kwargs, T):
    dim = _get(args, kwargs, 1, "dim")
    if dim is None:   # all dims of the step: all but time
        dim = tuple(range(1, _rank(node.args[0]) + 1))
    else:
        dim = tuple(_shift(x) for x in dim) if isinstance(dim, (tuple, list)) else _shift(dim)
    args, kwargs = _put(args, kwargs, 1, "dim", dim)
    return _emit(graph, node, args, kwargs)


def _seq_flatten(graph, node, args, kwargs, T):
    args, kwargs = _put(args, kwargs, 1, "start_dim", _shift(_get(args, kwargs, 1, "start_dim", 0)))
    if _get(args, kwargs, 2, "end_dim") is not None:
        args, kwargs = _put(args, kwargs, 2, "end_dim", _shift(_get(args, kwargs, 2, "end_dim")))
    return _emit(graph, node, args, kwargs)


def _seq_sizes(lead):
    """view/reshape (lead = T), repeat (lead = 1), expand (lead = -1): one entry for time in front
    of the per-step sizes (after the new leading dims that repeat/expand may add)."""
    def form(graph, node, args, kwargs, T):
        kwargs = dict(kwargs)
        sizes = _varargs(args, 1) if len(args) > 1 else tuple(kwargs.pop("shape", kwargs.pop("size", ())))
        extra = max(0, len(sizes) - _rank(node.args[0])) if lead != "T" else 0
        new = (*sizes[:extra], T if lead == "T" else lead, *sizes[extra:])
        return _emit(graph, node, (args[0], *new), kwargs)
    return form


def _seq_permute(graph, node, args, kwargs, T):
    kwargs = dict(kwargs)
    dims = _varargs(args, 1) if len(args) > 1 else tuple(kwargs.pop("dims"))
    rank = _rank(node.args[0])
    return _emit(graph, node, (args[0], (0, *[_norm(d, rank) + 1 for d in dims])), kwargs)


def _seq_getitem(graph, node, args, kwargs, T):
    if _of_multi_output(node):
        return _emit(graph, node, args, kwargs)
    idx = args[1] if isinstance(args[1], tuple) else (args[1],)
    if idx and idx[0] is Ellipsis and Ellipsis not in idx[1:] and None not in idx[1:]:
        return _emit(graph, node, args, kwargs)     # x[..., i] indexes from the end: time untouched
    return _emit(graph, node, (args[0], (slice(None), *idx)), kwargs)


def _seq_size(graph, node, args, kwargs, T):
    """``x.size()`` / ``x.size(d)`` / ``x.shape`` of the step: read from the first step ``x[0]``
    (a view; keeps a dynamic batch dynamic in ONNX)."""
    if node.op == "call_method" and _get(args, kwargs, 1, "dim") is not None:
        return _emit(graph, node, (args[0], _shift(_get(args, kwargs, 1, "dim"))), {})
    if node.op == "call_function" and args[1] != "shape":
        return _emit(graph, node, args, kwargs)
    step = graph.call_function(operator.getitem, (args[0], 0))
    return _emit(graph, node, (step, *args[1:]), kwargs)


# --- the records ------------------------------------------------------------------------------------

def _dims_op(name, fate, form, functions=(), methods=(), hooks=_BOTH, spiking="keep"):
    return OpRecord(name, functions=functions, methods=methods, spiking=spiking, hooks=hooks,
                    node_layout=_layout_rule(fate), seq_form=form)


def _elementwise(name, functions=(), methods=(), modules=(), spiking="no", hooks=_BOTH):
    return OpRecord(name, modules=modules, functions=functions, methods=methods, spiking=spiking, hooks=hooks)


for _rec in [
    _dims_op("unsqueeze", lambda n, r: _fate_dim(n, 1, "dim", None, r, insert=True), _seq_dim(1, "dim"),
             (torch.unsqueeze,), ("unsqueeze",)),
    _dims_op("squeeze", lambda n, r: _fate_dim(n, 1, "dim", None, r), _seq_dim(1, "dim", all_ones=True),
             (torch.squeeze,), ("squeeze",)),
    _dims_op("mean", _fate_reduce, _seq_reduce, (torch.mean,), ("mean",), spiking="no"),
    _dims_op("sum", _fate_reduce, _seq_reduce, (torch.sum,), ("sum",), spiking="no"),
    _dims_op("flatten", _fate_flatten, _seq_flatten, (torch.flatten,), ("flatten",),
             hooks={**_VIEW, "nir_out": FORWARD}),
    _dims_op("permute", _fate_permute, _seq_permute, (torch.permute,), ("permute",)),
    _dims_op("repeat", _fate_repeat, _seq_sizes(1), (), ("repeat",)),
    _dims_op("expand", _fate_expand, _seq_sizes(-1), (), ("expand",)),
    _dims_op("cat", lambda n, r: _fate_dim(n, 1, "dim", 0, r), _seq_dim(1, "dim", 0), (torch.cat, torch.concat), ()),
    OpRecord("stack", functions=(torch.stack,), spiking="keep", hooks=_BOTH, node_layout=_stack_layout,
             seq_form=_seq_dim(1, "dim", 0)),
    _dims_op("getitem", _fate_getitem, _seq_getitem, (operator.getitem,),
             hooks={"onnx": FORWARD, "tvm": "snnc.targets.tvm_tensor_ops:convert_getitem"}),
    OpRecord("view", methods=("view",), spiking="keep", hooks=_VIEW, node_layout=_reshape_layout,
             seq_form=_seq_sizes("T")),
    OpRecord("reshape", functions=(torch.reshape,), methods=("reshape",), spiking="keep", hooks=_VIEW,
             node_layout=_reshape_layout, seq_form=_seq_sizes("T")),
    OpRecord("size", methods=("size",), hooks=_BOTH, seq_form=_seq_size),
    OpRecord("getattr", functions=(getattr,), hooks=_BOTH, seq_form=_seq_size),
    OpRecord("contiguous", methods=("contiguous",), spiking="keep", hooks=_VIEW),
    _elementwise("sub", (operator.sub, torch.sub), ("sub",)),
    _elementwise("neg", (operator.neg, torch.neg), ("neg",)),
    # torch.fx records ``a += b`` as ``add`` (a Proxy has no __iadd__); this record is for graphs
    # that carry the in-place op itself
    OpRecord("iadd", functions=(operator.iadd,), hooks=_BOTH),
    _elementwise("nn.gelu", (F.gelu,), ("gelu",), (nn.GELU,)),
    _elementwise("nn.sigmoid", (torch.sigmoid, F.sigmoid), ("sigmoid",), (nn.Sigmoid,)),
    _elementwise("nn.tanh", (torch.tanh, F.tanh), ("tanh",), (nn.Tanh,)),
]:
    register(_rec)


def _transpose_form(graph, node, args, kwargs, T):
    for i, name in ((1, "dim0"), (2, "dim1")):
        args, kwargs = _put(args, kwargs, i, name, _shift(_get(args, kwargs, i, name)))
    return _emit(graph, node, args, kwargs)


register(_dims_op("transpose", _fate_transpose, _transpose_form, (torch.transpose,), ("transpose",)))
