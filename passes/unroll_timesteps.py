"""unroll_timesteps: per-step graph -> one multi-step graph over ``[T, N, ...]`` (Wu 2019).

Assumes: a per-step spiking-IR graph (``gm.snnc_spec["layout"] == "step"``, not yet unrolled)
whose stateful ops are ``snnc.ops`` neurons, encoders and readouts.

Guarantees: the result computes, in one call, what T calls of the per-step graph compute:
  * neurons run their multi-step form, the iterative update of Wu 2019 with the membrane kept
    local over the T loop (``snn.lif(%x) : spike[T,N,...]@seq``);
  * stateless layers (conv, linear, pooling, BN, reshapes) run once on the time-flattened batch
    ``[T*N, ...]``; ``time.merge`` / ``time.split`` nodes are inserted only where a neuron needs
    ``[T, N, ...]`` and a stateless layer needs ``[T*N, ...]``;
  * a graph with an encoder keeps its static input ``[N, ...]``; with ``hoist_encoder`` (default)
    a ``DirectEncoder`` is moved past the stateless layers before the first neuron, since those
    layers see the same input at every step and need to run once, not T times;
  * a graph without an encoder takes ``[T, N, ...]`` inputs; readouts reduce over T.
The input graph is not modified. In eval mode, outputs equal the per-step reference run for T
steps (same op order per element; bit-exact in float32 where BLAS rounds a row the same at
batch N and T*N, else within float rounding). In training mode a BatchNorm on
the merged batch takes its statistics over T*N samples instead of N per step (the statistics
tdBN uses), so training-mode outputs differ from T separate per-step calls.
"""
from __future__ import annotations

import copy

from torch import fx

from snnc.errors import SnncError, node_ref
from snnc.ir import annotate, graph_spec, info, op_spec
from snnc.ops import registry
from snnc.ops import DirectEncoder, MergeTime, SplitTime

STATIC, SEQ, FLAT = "static", "seq", "flat"
CONST = "const"  # a get_attr parameter/constant: broadcasts against any layout, never converted


class _Rewriter:
    def __init__(self, root, T):
        self.root, self.T = root, T
        self.graph = fx.Graph()
        self.env = {}        # old node -> (new node, layout)
        self.converted = {}  # (old node, layout) -> new node
        self.counter = 0

    def add_module(self, prefix, mod):
        self.counter += 1
        name = f"{prefix}_{self.counter}"
        while hasattr(self.root, name):
            self.counter += 1
            name = f"{prefix}_{self.counter}"
        self.root.add_module(name, mod)
        return name

    def as_layout(self, old, want):
        new, have = self.env[old]
        if have == want:
            return new
        key = (old, want)
        if key not in self.converted:
            if have == STATIC:      # time-invariant value: broadcast it over T
                enc = self.add_module("encoder", DirectEncoder(T=self.T, step_mode="m"))
                seq = self.graph.call_module(enc, (new,))
                out = seq if want == SEQ else self.graph.call_module(self.add_module("merge_time", MergeTime()), (seq,))
            elif have == SEQ:
                out = self.graph.call_module(self.add_module("merge_time", MergeTime()), (new,))
            else:
                out = self.graph.call_module(self.add_module("split_time", SplitTime(self.T)), (new,))
            self.converted[key] = out
        return self.converted[key]


def _tensor_inputs(node):
    return [a for a in node.all_input_nodes]


def _seq_form(rw, node, rec):
    """An op that names dims (``x.mean(1)``, ``torch.cat(xs, 1)``, ``x.view(N, -1)``) runs once on
    ``[T, N, ...]`` with its dims moved past time (its record's ``seq_form``), instead of on the
    merged batch where dim 0 would mix steps. Its tensor inputs become ``[T, N, ...]``; values
    without time (sizes, shapes) stay as they are."""
    def arg(a):
        if rw.env[a][1] in (SEQ, FLAT) or (rw.env[a][1] == STATIC and info(a) is not None):
            return rw.as_layout(a, SEQ)
        return rw.env[a][0]
    args = fx.node.map_arg(node.args, arg)
    kwargs = fx.node.map_arg(node.kwargs, arg)
    new = rec.seq_form(rw.graph, node, args, kwargs, rw.T)
    return new, SEQ if info(node) is not None else STATIC


def unroll_timesteps(gm: fx.GraphModule, T: int, hoist_encoder: bool = True) -> fx.GraphModule:
    """Return the multi-step form of per-step graph ``gm`` over ``T`` time steps."""
    if not isinstance(T, int) or T < 1:
        raise SnncError(f"unroll_timesteps: T must be a positive int, got {T!r}")
    spec = graph_spec(gm)
    if spec.get("T"):
        raise SnncError(f"unroll_timesteps: the graph is already multi-step (T={spec['T']})")
    root = copy.deepcopy(gm)
    rw = _Rewriter(root, T)
    has_encoder = any(getattr(registry.module_record(m), "over_time", "") == "encode" for m in root.modules())
    in_layout = STATIC if has_encoder else SEQ

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            rw.env[node] = (rw.graph.node_copy(node), in_layout)
            continue
        if node.op == "output":
            def out_arg(a):
                if isinstance(a, fx.Node):
                    lay = rw.env[a][1]
                    return rw.as_layout(a, SEQ) if lay == FLAT else rw.env[a][0]
                return a
            rw.graph.output(fx.node.map_aggregate(node.args[0], out_arg))
            continue
        if node.op == "get_attr":
            rw.env[node] = (rw.graph.node_copy(node), CONST)
            continue
        mod = root.get_submodule(node.target) if node.op == "call_module" else None
        ins = _tensor_inputs(node)
        rec = op_spec(gm, node)
        if rec is None:
            raise SnncError(f"unroll_timesteps: {node_ref(node)} is not an op of the spiking IR")
        if rec.over_time == "loop":   # neurons, readouts, NeuNorm: the op loops over T itself
            mod.step_mode = "m"
            new = rw.graph.node_copy(node, lambda a: rw.as_layout(a, SEQ))
            rw.env[node] = (new, STATIC if rec.layout(mod, [SEQ]) == "step" else SEQ)
        elif isinstance(mod, DirectEncoder) and hoist_encoder:
            rw.env[node] = (rw.env[ins[0]][0], rw.env[ins[0]][1])   # removed: broadcast where needed
        elif rec.over_time == "encode":
            if rw.env[ins[0]][1] != STATIC:
                raise SnncError(f"unroll_timesteps: {node_ref(node)} encodes a value that already has time")
            mod.step_mode, mod.T = "m", T
            rw.env[node] = (rw.graph.node_copy(node, lambda a: rw.env[a][0]), SEQ)
        elif rec.seq_form is not None and {rw.env[a][1] for a in ins} & {SEQ, FLAT}:
            rw.env[node] = _seq_form(rw, node, rec)
        else:
            layouts = {rw.env[a][1] for a in ins} - {CONST}
            if not layouts or layouts == {STATIC}:
                want = STATIC
            elif rec.time_agnostic and len(layouts) == 1:
                want = layouts.pop()
            else:
                want = FLAT
            new = rw.graph.node_copy(
                node, lambda a: rw.env[a][0] if want == STATIC or rw.env[a][1] == CONST else rw.as_layout(a, want))
            rw.env[node] = (new, want)

    out = fx.GraphModule(root, rw.graph, class_name=type(gm).__name__)
    out.graph.eliminate_dead_code()
    out.recompile()
    out.delete_all_unused_submodules()
    shapes = [(tuple(s) if in_layout == STATIC else (T, *s), d) for s, d in spec["inputs"]]
    out.snnc_spec = {"inputs": shapes, "layout": "step" if in_layout == STATIC else "seq", "T": T}
    return annotate(out)
