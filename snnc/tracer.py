"""``snnc.trace``: torch.fx tracing of ANNs and SNNs into the spiking IR."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .errors import SnncError, TraceError
from .frontends import convert_foreign_modules
from .ir import annotate, make_spec
from .ops import is_snnc_op, registry


class _Tracer(fx.Tracer):
    """Keeps snnc ops and known torch.nn layers as leaves; remembers which module it is inside
    so that a failure can name it."""

    def __init__(self):
        super().__init__()
        self.stack = []
        self.failed_in = None

    def is_leaf_module(self, m, qualname):
        return is_snnc_op(m) or registry.module_record(m) is not None or super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self.stack.append(self.path_of_module(m) or type(m).__name__)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # innermost module first
                self.failed_in = f"{self.stack[-1]}' ({type(m).__name__})"
            raise
        finally:
            self.stack.pop()


def _layout_of(model):
    modes = [m for m in model.modules() if is_snnc_op(m) and getattr(m, "step_mode", "s") == "m"]
    if not modes:
        return "step", None
    encoders = [m for m in modes if getattr(m, "T", None)]
    return ("step", encoders[0].T) if encoders else ("seq", None)


def trace(model: nn.Module, example_inputs, *, concrete_args=None) -> fx.GraphModule:
    """Trace ``model`` into the spiking IR; the model itself is not modified.

    ``example_inputs`` (a tensor or a tuple of tensors) fixes the input shapes recorded in the
    graph's spec; the graph is run once on them to annotate every node (shape, dtype, spiking,
    time layout) and then verified. Per-step models get the ``step`` layout; models whose snnc
    ops are multi-step (``step_mode="m"``) get ``seq`` inputs ``[T, N, ...]``.
    """
    if not isinstance(model, nn.Module):
        raise TraceError(f"snnc.trace expects an nn.Module, got {type(model).__name__}")
    example = list(example_inputs) if isinstance(example_inputs, (tuple, list)) else [example_inputs]
    for i, x in enumerate(example):
        if not isinstance(x, torch.Tensor):
            raise TraceError(f"example_inputs[{i}] is a {type(x).__name__}, expected a torch.Tensor")
    model = convert_foreign_modules(copy.deepcopy(model), example)
    tracer = _Tracer()
    if tracer.is_leaf_module(model, ""):  # a bare layer: trace it as a one-op graph
        model = nn.Sequential(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except SnncError:
        raise
    except Exception as e:
        where = f"module '{tracer.failed_in}" if tracer.failed_in else "the top-level forward"
        raise TraceError(f"cannot trace {type(model).__name__}: failed inside {where}: "
                         f"{type(e).__name__}: {e}. torch.fx traces symbolically, so Python control flow "
                         "on tensor values is not supported there; make that module a leaf op or "
                         "remove the data-dependent branch") from None
    gm = fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)
    layout, T = _layout_of(gm)
    gm.snnc_spec = make_spec(example, layout=layout, T=T if T else (example[0].shape[0] if layout == "seq" else None))
    from .verifier import check_known_ops, verify
    check_known_ops(gm)
    annotate(gm, example)
    return verify(gm)
