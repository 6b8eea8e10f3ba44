"""Capturing the Python that torch.fx's symbolic trace cannot follow, and explicit time loops.

Two tools for ``snnc.trace``:

* ``value_trace(model, inputs)``: an fx trace whose proxies also carry the real value computed on
  the example inputs, so ``range(x.shape[0])``, ``len(x)``, ``if x.dim() == 4`` and tuple
  unpacking of a neuron's ``(spikes, state)`` resolve to Python values while the tensor dataflow
  is recorded (snnc ops and known torch.nn layers stay leaves, as in the plain trace).
* ``reroll(gm)``: a model that loops over time inside its ``forward`` (snntorch's tutorial
  ``for step in range(num_steps): spk, mem = lif(cur, mem)`` with ``torch.stack(spk_rec)``; norse's
  ``for ts in range(T): z, s = cell(x[ts], s)``) traces into T copies of one step. Each neuron
  module keeps its own membrane (the state the model threads through is always the one the same
  module returned the step before), so the T copies collapse into the graph of ONE step: nodes
  are identified by what they compute with the threaded state left out, the input slice
  ``x[t]`` becomes the per-step input and ``torch.stack`` of a per-step value becomes the
  graph's multi-step output. ``snnc.trace`` unrolls that step graph over the same T and checks it
  against the model's own output on the example before returning it.
"""
from __future__ import annotations

import operator

import torch
from torch import fx, nn

from .errors import TraceError


class _DataDependent(Exception):
    """Raised inside the value trace; ``snnc.trace`` then reports the symbolic trace's own error."""


class _ValueProxy(fx.Proxy):
    """A proxy that knows the concrete value of its node on the example inputs."""

    value = None

    def __getattr__(self, k):
        attr = super().__getattr__(k)
        if k.startswith("__") or callable(getattr(self.value, k, None)):
            return attr  # a method: its call becomes a call_method node
        return self.tracer.create_proxy("call_function", getattr, (self, k), {})  # shape, dtype, ...

    def __iter__(self):
        if isinstance(self.value, (tuple, list)):
            return iter([self[i] for i in range(len(self.value))])
        return super().__iter__()

    def __len__(self):
        return len(self.value)

    def _python(self):
        # shapes, sizes and lengths may steer Python; a tensor's values may not (the graph would be
        # silently specialised to the example)
        if isinstance(self.value, torch.Tensor):
            raise _DataDependent(f"Python control flow on the values of {self.node.name}")
        return self.value

    def __bool__(self):
        return bool(self._python())

    def __index__(self):
        return int(self._python())

    def __int__(self):
        return int(self._python())


def _value_of(v):
    if isinstance(v, _ValueProxy):
        return v.value
    if isinstance(v, fx.proxy.Attribute):
        return getattr(_value_of(v.root), v.attr)
    return v


def _concrete(a):
    if isinstance(a, fx.Proxy):
        return _value_of(a)
    return fx.node.map_aggregate(a, _value_of)


class _unpatched:
    """fx patches ``nn.Module.__call__`` / ``__getattr__`` while tracing; a leaf's real value is
    computed with the originals, so its inner modules run instead of being recorded."""

    def __enter__(self):
        from torch.fx import _symbolic_trace as st
        self.saved = nn.Module.__call__, nn.Module.__getattr__
        nn.Module.__call__, nn.Module.__getattr__ = st._orig_module_call, st._orig_module_getattr

    def __exit__(self, *exc):
        nn.Module.__call__, nn.Module.__getattr__ = self.saved


def value_tracer(base: type):
    """A subclass of the tracer class ``base`` that evaluates every node as it records it."""

    class ValueTracer(base):
        def __init__(self, inputs):
            super().__init__()
            self._inputs = list(inputs)

        def proxy(self, node):
            return _ValueProxy(node, self)

        def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
            p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
            a, kw = _concrete(args), _concrete(kwargs)
            if kind == "placeholder":
                value = self._inputs.pop(0) if self._inputs else None
            elif kind == "get_attr":
                value = self.root
                for part in target.split("."):
                    value = getattr(value, part)
            elif kind == "call_module":
                with _unpatched():
                    value = self.root.get_submodule(target)(*a, **kw)
            elif kind == "call_function":
                value = target(*a, **kw)
            elif kind == "call_method":
                value = getattr(a[0], target)(*a[1:], **kw)
            else:
                value = None
            p.value = value
            p.node.meta["value"] = value
            return p

    return ValueTracer


# --- rerolling an explicit loop over time ---------------------------------------------------------

def _stateful(mod) -> bool:
    return hasattr(mod, "reset") and hasattr(type(mod), "op_name") and hasattr(mod, "attrs")


def _hashable(v):
    if isinstance(v, slice):
        return ("slice", v.start, v.stop, v.step)
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(e) for e in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(e)) for k, e in v.items()))
    if isinstance(v, torch.Tensor):
        return ("tensor", id(v))
    if isinstance(v, (torch.dtype, torch.device, torch.Size)):
        return str(v)
    try:
        hash(v)
    except TypeError:
        return ("obj", id(v))
    return v


def time_loop(gm: fx.GraphModule) -> bool:
    """Whether the trace is T copies of one step: stateful ops called T > 1 times each, and the
    per-step results stacked (``torch.stack`` of T values) or explicit state threaded through
    (a module called twice within one step, e.g. ``lif(x) + lif(2 * x)``, is not a loop)."""
    counts = repeated_calls(gm)
    if not counts:
        return False
    explicit = any(isinstance(m, ExplicitState) for m in gm.modules())
    stacked = any(n.op == "call_function" and n.target is torch.stack and isinstance(n.args[0], (list, tuple))
                  and len(n.args[0]) == max(counts.values()) for n in gm.graph.nodes)
    return explicit or stacked


def repeated_calls(gm: fx.GraphModule) -> dict:
    """``{module target: number of calls}`` for stateful snnc ops called more than once."""
    counts = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and _stateful(gm.get_submodule(n.target)):
            counts[n.target] = counts.get(n.target, 0) + 1
    return {t: c for t, c in counts.items() if c > 1}


def reroll(gm: fx.GraphModule, state_args: dict):
    """``(step graph, T, sliced)``: the graph of one step of a model whose trace repeats each
    stateful op T times; ``sliced`` says whether the inputs were indexed per step (``x[t]``)
    rather than fed whole at every step. ``state_args``: module target -> number of leading
    data arguments (the rest is threaded state, ignored: the op keeps its own)."""
    calls = {}
    for n in gm.graph.nodes:
        if n.op == "call_module" and _stateful(gm.get_submodule(n.target)):
            calls.setdefault(n.target, []).append(n)
    counts = {t: len(c) for t, c in calls.items()}
    T = max(counts.values())
    if len(set(counts.values())) != 1:
        raise TraceError("cannot capture the loop over time in forward: the stateful modules are called "
                         f"different numbers of times ({', '.join(f'{t!r}: {c}' for t, c in counts.items())})")
    # which values are indexed x[0], x[1], ..., x[T-1]: the per-step input slices
    slices = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is operator.getitem and isinstance(n.args[1], int) \
                and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder":
            slices.setdefault(n.args[0], set()).add(n.args[1])
    sliced_inputs = {a for a, idx in slices.items() if idx == set(range(T))}

    key, depends = {}, {}   # node -> class key; node -> whether it depends on a stateful op
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        if n.op == "placeholder":
            key[n], depends[n] = ("in", n.name), False
            continue
        if n.op == "get_attr":
            key[n], depends[n] = ("attr", n.target), False
            continue
        args = n.args
        if n.op == "call_module" and n.target in calls:
            args = n.args[:state_args.get(n.target, 1)]
        if n.op == "call_function" and n.target is operator.getitem and n.args[0] in sliced_inputs:
            key[n], depends[n] = ("step_input", n.args[0].name), False
            continue
        mapped = fx.node.map_arg((args, n.kwargs), lambda a: key[a])
        key[n] = (n.op, _hashable(n.target), _hashable(mapped))
        ins = []
        fx.node.map_arg((args, n.kwargs), ins.append)
        depends[n] = (n.op == "call_module" and n.target in calls) or any(depends[a] for a in ins)
    members = {}
    for n, k in key.items():
        members.setdefault(k, []).append(n)
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in calls and len(members[key[n]]) != T:
            raise TraceError(f"cannot capture the loop over time in forward: the input of module '{n.target}' "
                             "changes from one step to the next through something other than a neuron's own "
                             "state (a value carried across steps by the Python code); snnc captures loops whose "
                             "steps differ only in neuron state and in the input slice x[t]")

    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    step = fx.Graph()
    new = {}

    def class_node(n):
        k = key[n]
        if k in new:
            return new[k]
        if k[0] == "step_input":
            src = n.args[0]
            new[k] = step.placeholder(src.name)
            new[k].meta["example"] = n.meta.get("value")
            return new[k]
        if n.op == "placeholder":
            if n in sliced_inputs:
                raise TraceError(f"cannot capture the loop over time in forward: input {n.name!r} is used both "
                                 "per step (x[t]) and whole")
            new[k] = step.placeholder(n.name)
            new[k].meta["example"] = n.meta.get("value")
            return new[k]
        args = n.args
        if n.op == "call_module" and n.target in calls:
            args = n.args[:state_args.get(n.target, 1)]
        if depends[n] and len(members[k]) != T:
            raise TraceError(f"cannot capture the loop over time in forward: {n.op} {n.target!r} ({n.name}) "
                             f"is computed {len(members[k])} time(s) for {T} steps (a value accumulated or "
                             "selected across steps); return torch.stack of the per-step values instead")
        a, kw = fx.node.map_arg((args, n.kwargs), class_node)
        new[k] = step.create_node(n.op, n.target, a, kw, name=n.name)
        return new[k]

    def output_value(v):
        if isinstance(v, fx.Node) and v.op == "call_function" and v.target is torch.stack:
            items = v.args[0]
            dim = v.args[1] if len(v.args) > 1 else v.kwargs.get("dim", 0)
            if dim != 0 or len(items) != T or len({key[i] for i in items}) != 1:
                raise TraceError(f"cannot capture the loop over time in forward: the output {v.name} stacks "
                                 f"{len(items)} values along dim {dim}; snnc captures torch.stack(per-step values) "
                                 "along dim 0, one value per step")
            return class_node(items[0])
        if isinstance(v, fx.Node):
            raise TraceError(f"cannot capture the loop over time in forward: the output {v.name} is not "
                             "torch.stack(per-step values, dim=0) (e.g. the last step's value only)")
        return v

    for u in gm.graph.nodes:  # a stacked record may only be returned
        if u.op == "call_function" and u.target is torch.stack and any(x.op != "output" for x in u.users):
            raise TraceError(f"cannot capture the loop over time in forward: {u.name} = torch.stack(...) feeds "
                             f"{', '.join(x.name for x in u.users)}; return the stacked records, and reduce "
                             "them outside the model")
    step.output(fx.node.map_aggregate(out_node.args[0], output_value))
    return step, T, bool(sliced_inputs)


class ExplicitState(nn.Module):
    """Capture-time stand-in for a peer neuron called with explicit state (``spk, mem = lif(x, mem)``,
    ``z, s = cell(x, s)``): ``op`` keeps the state itself, the threaded state is ignored, and
    ``init_*`` methods of the peer (``lif.init_leaky()``) still answer. ``data_args``: how many
    leading arguments are data (the rest is the state)."""

    op_name = "capture.explicit_state"

    def __init__(self, op: nn.Module, peer: nn.Module, data_args: int = 1, pack_state: bool = False):
        super().__init__()
        self.op, self.data_args, self.pack_state = op, data_args, pack_state
        object.__setattr__(self, "_peer", peer)

    def forward(self, *args, **kwargs):
        out = self.op(*args[:self.data_args])
        return (out[0], tuple(out[1:])) if self.pack_state else out  # norse: (output, state)

    def reset(self):
        self.op.reset()

    def attrs(self):
        return self.op.attrs()

    def __getattr__(self, name):
        if name.startswith("init_") and self.__dict__.get("_peer") is not None:
            return getattr(self.__dict__["_peer"], name)
        return super().__getattr__(name)


# --- spikingjelly's multi-step idioms ----------------------------------------------------------------

def _is_method(n, name):
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target == name


def _dim0(n) -> bool:
    dims = n.args[1:] or (n.kwargs.get("dim"),)
    return len(dims) == 1 and dims[0] in (0, (0,), [0]) and not n.kwargs.get("keepdim", False)


def time_idioms(gm: fx.GraphModule) -> fx.GraphModule:
    """Rewrite, in a graph with multi-step ops, the tensor idioms that add and remove the time
    dimension in spikingjelly's tutorials into snnc ops, in place:

        x.unsqueeze(0).repeat(T, 1, ..., 1)   (or .expand(T, ...))  ->  snn.direct_encoder {T}
        y.mean(0)                                                  ->  snn.readout (mean over T)

    ``repeat`` copies where the encoder broadcasts, and the readout sums step by step where
    ``mean`` may reduce pairwise: for spikes (integers) both are the same numbers."""
    from .ops import DirectEncoder, Readout, SplitTime, is_snnc_op
    if not any(is_snnc_op(m) and getattr(m, "step_mode", "s") == "m" for m in gm.modules()):
        return gm
    changed = False
    for n in list(gm.graph.nodes):
        if _is_method(n, "unsqueeze") and n.args[1:] in ((0,),) and len(n.users) == 1:
            (user,) = n.users
            reps = user.args[1:]
            if len(reps) == 1 and isinstance(reps[0], (tuple, list)):
                reps = tuple(reps[0])
            if (_is_method(user, "repeat") and len(reps) >= 2 and isinstance(reps[0], int)
                    and all(r == 1 for r in reps[1:])) or \
                    (_is_method(user, "expand") and len(reps) >= 2 and isinstance(reps[0], int)
                     and all(r == -1 for r in reps[1:])):
                name = f"time_encoder_{n.name}"
                gm.add_module(name, DirectEncoder(T=int(reps[0]), step_mode="m"))
                with gm.graph.inserting_after(user):
                    enc = gm.graph.call_module(name, (n.args[0],))
                user.replace_all_uses_with(enc)
                gm.graph.erase_node(user)
                gm.graph.erase_node(n)
                changed = True
        elif _is_method(n, "mean") and _dim0(n):
            src = n.args[0]
            spiking = src.op == "call_module" and getattr(gm.get_submodule(src.target), "step_mode", "s") == "m"
            name = f"time_readout_{n.name}"
            gm.add_module(name, Readout(mode="spike_count" if spiking else "membrane", step_mode="m"))
            with gm.graph.inserting_after(n):
                r = gm.graph.call_module(name, (src,))
            n.replace_all_uses_with(r)
            gm.graph.erase_node(n)
            changed = True
    splits = {m.T for m in gm.modules() if isinstance(m, SplitTime)}
    for n in list(gm.graph.nodes):
        # the zoo's ``torch.flatten(x, 2)`` when step_mode == "m": flatten each [C, H, W] sample of
        # [T, N, C, H, W] -> time.merge, flatten(1), time.split (the T of the model's other splits)
        is_flatten = (n.op == "call_function" and n.target is torch.flatten) or _is_method(n, "flatten")
        start = (n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)) if is_flatten else None
        if is_flatten and start == 2 and len(n.args) <= 2 and not n.kwargs.get("end_dim") and len(splits) == 1:
            from .ops import MergeTime
            merge, split = f"time_merge_{n.name}", f"time_split_{n.name}"
            gm.add_module(merge, MergeTime())
            gm.add_module(split, SplitTime(next(iter(splits))))
            with gm.graph.inserting_before(n):
                a = gm.graph.call_module(merge, (n.args[0],))
                b = gm.graph.call_function(torch.flatten, (a, 1))
                c = gm.graph.call_module(split, (b,))
            n.replace_all_uses_with(c)
            gm.graph.erase_node(n)
            changed = True
    if changed:
        # the front ends took T from the example's leading dim; here the model makes time itself
        steps = {m.T for m in gm.modules() if isinstance(m, DirectEncoder) and m.step_mode == "m"}
        if len(steps) == 1:
            for m in gm.modules():
                if isinstance(m, SplitTime):
                    m.T = next(iter(steps))
        gm.recompile()
    return gm
