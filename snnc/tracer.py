"""``snnc.trace``: torch.fx tracing of ANNs and SNNs into the spiking IR."""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .errors import SnncError, TraceError
from .frontends import convert_foreign_modules
from . import runtime
from .capture import ExplicitState, reroll, time_idioms, time_loop, value_tracer
from .ir import annotate, make_spec
from .ops import DirectEncoder, is_snnc_op, registry


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


def _layout_of(model, example=None):
    # batch-first multi-step ops (sinabs) take the model's own input and know T themselves
    own = [m for m in model.modules() if getattr(m, "own_time_layout", False)]
    if own and example is not None:
        return "step", own[0].steps(example[0]) if own[0].squeeze else example[0].shape[1]
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
        # symbolic tracing stops at Python that needs values (range(x.shape[0]), len(state), tuple
        # unpacking): trace again with the example's real values alongside the proxies
        first = (tracer.failed_in, e)
        runtime.reset(model)
        tracer = value_tracer(_Tracer)(example)
        try:
            with torch.no_grad():
                graph = tracer.trace(model, concrete_args=concrete_args)
        except SnncError:
            raise
        except Exception:
            failed_in, e = first
            where = f"module '{failed_in}" if failed_in else "the top-level forward"
            raise TraceError(f"cannot trace {type(model).__name__}: failed inside {where}: "
                             f"{type(e).__name__}: {e}. torch.fx traces symbolically, so Python control flow "
                             "on tensor values is not supported there; make that module a leaf op or "
                             "remove the data-dependent branch") from None
        finally:
            runtime.reset(model)
    gm = time_idioms(fx.GraphModule(tracer.root, graph, class_name=type(model).__name__))
    if time_loop(gm):
        return _trace_loop(model, gm, example)
    _unwrap_explicit_state(gm)
    layout, T = _layout_of(gm, example)
    gm.snnc_spec = make_spec(example, layout=layout, T=T if T else (example[0].shape[0] if layout == "seq" else None))
    from .verifier import check_known_ops, verify
    check_known_ops(gm)
    annotate(gm, example)
    return verify(gm)


def _trace_loop(model, gm, example) -> fx.GraphModule:
    """A model that runs T steps inside its ``forward``: reroll its trace into one step, unroll that
    over T, and check the result against the model's own output on the example."""
    state_args = {n.target: getattr(gm.get_submodule(n.target), "data_args", 1)
                  for n in gm.graph.nodes if n.op == "call_module"}
    graph, T, sliced = reroll(gm, state_args)
    root = copy.deepcopy(gm)  # the model itself still runs below, as the reference
    for name, m in list(root.named_modules()):
        if isinstance(m, ExplicitState):
            root.set_submodule(name, m.op) if hasattr(root, "set_submodule") else setattr(root, name, m.op)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    step_example = [n.meta["example"] if n.meta.get("example") is not None else x for n, x in
                    zip(placeholders, [x[0] if sliced else x for x in example])]
    if not sliced:  # the same input at every step: a direct encoder, which unroll_timesteps hoists
        for i, p in enumerate(placeholders):
            enc = f"_input_encoder_{i}"
            root.add_module(enc, DirectEncoder())
            with graph.inserting_after(p):
                e = graph.call_module(enc, (p,))
            p.replace_all_uses_with(e, delete_user_cb=lambda u: u is not e)
    _drop_unused_state_outputs(root, graph)
    step = fx.GraphModule(root, graph, class_name=type(model).__name__)
    step.delete_all_unused_submodules()
    step.snnc_spec = make_spec(step_example, layout="step")
    from .passes import unroll_timesteps
    from .verifier import check_known_ops, verify
    check_known_ops(step)
    annotate(step, step_example)
    verify(step)
    out = unroll_timesteps(step, T=T)
    runtime.reset(model)
    with torch.no_grad():
        want = model(*example)
        got = runtime.run(out, example)
    runtime.reset(model)
    flat_w, flat_g = runtime.leaves(want), runtime.leaves(got)
    if len(flat_w) != len(flat_g) or any(a.shape != b.shape or not torch.allclose(a, b, atol=1e-5, rtol=1e-5)
                                         for a, b in zip(flat_w, flat_g)):
        raise TraceError(f"cannot capture the loop over time in {type(model).__name__}.forward: the graph of one "
                         f"step, run for T={T} steps, does not reproduce the model's output on the example")
    return out


def _unwrap_explicit_state(gm):
    """A peer neuron called once per forward with explicit state (``spk, mem = lif(x)`` in a
    per-step model): its op keeps the state between calls, as the peer does when no state is passed."""
    for n in gm.graph.nodes:
        if n.op == "call_module" and len(n.args) > 1 and isinstance(gm.get_submodule(n.target), ExplicitState):
            n.args = n.args[:1]
    for name, m in list(gm.named_modules()):
        if isinstance(m, ExplicitState):
            if m.pack_state or m.data_args != 1:
                raise TraceError(f"module '{name}': a neuron called once with explicit state in and out; snnc "
                                 "captures this style inside a loop over time in forward")
            gm.set_submodule(name, m.op)
    gm.recompile()


def _drop_unused_state_outputs(root, graph):
    """A neuron whose reported state (``spk, mem = lif(x, mem)``) only feeds its own next step
    returns its spikes alone, so it keeps its fused multi-step form."""
    import operator
    for n in list(graph.nodes):
        mod = root.get_submodule(n.target) if n.op == "call_module" else None
        flag = next((f for f in ("output_membrane", "output_state") if getattr(mod, f, False)), None)
        if flag and n.users and all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0
                                    for u in n.users):
            setattr(mod, flag, False)
            for u in list(n.users):
                u.replace_all_uses_with(n)
                graph.erase_node(u)

