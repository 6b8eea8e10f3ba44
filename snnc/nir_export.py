"""NIR export: ``snnc.to_nir(gm, dt=1.0, path=None)`` -> ``nir.NIRGraph`` (and a ``.nir`` file).

The inverse of the discretisation in ``snnc/nir.py`` (forward Euler with step ``dt``):

    snn.lif {decay, gain}  ->  LIF(tau = dt / (1 - decay), r = gain / (1 - decay), v_leak, ...)
    snn.plif (k = sigmoid(w)) ->  LIF(tau = dt / k, r = 1, v_leak)
    snn.if                 ->  IF(r = 1/dt, v_threshold, v_reset)   (one input per step)

NIR's neurons fire on ``v > v_threshold`` and reset to ``v_reset``. snnc neurons that compare
with ``>=``, reset by subtraction or start from ``v_init != 0`` have no NIR field for that: the
exact snnc neuron is always written to the node's ``metadata`` (``snnc_op``, ``decay``/``tau``,
``decay_input``, ``reset``, ``compare``, ``v_init``) and ``dt`` to the graph's metadata, so
``snnc.from_nir`` restores it exactly; other NIR readers see the nearest standard neuron, and a
``UserWarning`` names the nodes whose NIR reading differs.

Other ops: nn.linear -> Affine (Linear without bias), nn.conv1d/2d -> Conv1d/Conv2d,
nn.flatten / flatten -> Flatten (batchless dims), nn.avg_pool2d -> AvgPool2d, and
``nn.avg_pool2d`` followed only by ``mul(k_h*k_w)`` -> SumPool2d; ``mul`` by a constant -> Scale;
``add`` -> fan-in edges; the per-step ``snn.direct_encoder``, dropout and identity pass through.
Shapes are written without the batch dimension (the NIR convention).
"""
from __future__ import annotations

import operator
import warnings

import numpy as np
import torch
from torch import fx, nn

from .errors import SnncError, UnsupportedOp, node_ref
from .fileio import atomic_write
from .ir import graph_spec, info, op_name
from .ops import IF, LIF, DirectEncoder, ParametricLIF, registry

_PASS_THROUGH = (DirectEncoder, nn.Dropout, nn.Identity)
_QUALIFIED = {"mul": "mul (by a constant)", "snn.direct_encoder": "snn.direct_encoder (per-step)"}


def supported_ops() -> list[str]:
    """The ops whose record has a ``nir_out`` hook (the mapping itself is below)."""
    return [_QUALIFIED.get(n, n) for n in registry.supported("nir_out")]


def _np(t) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32) if isinstance(t, torch.Tensor) else np.asarray(t, np.float32)


def _full(value, shape) -> np.ndarray:
    """A per-neuron array of ``shape`` (float64 for scalars: keeps Python floats exact in the file)."""
    if isinstance(value, torch.Tensor):
        return np.broadcast_to(_np(value), shape).copy()
    return np.full(shape, float(value), dtype=np.float64)


def _neuron(mod, shape, dt):
    """The NIR node for an snnc neuron over a batchless ``shape``, plus the exact snnc form."""
    import nir
    meta = {"snnc_op": type(mod).op_name, "reset": mod.reset_mode, "compare": mod.compare}
    if mod.v_init != 0.0:
        meta["v_init"] = mod.v_init
    v_th, v_reset = _full(mod.v_th, shape), _full(mod.v_reset if mod.reset_mode == "zero" else 0.0, shape)
    if isinstance(mod, IF):
        return nir.IF(r=_full(1.0 / dt, shape), v_threshold=v_th, v_reset=v_reset, metadata=meta)
    if isinstance(mod, ParametricLIF):
        k = float(mod.w.detach().sigmoid())
        meta.update(w=float(mod.w.detach()), v_leak=mod.v_leak)
        tau, r, v_leak = dt / k, 1.0, mod.v_leak
    elif isinstance(mod, LIF):
        if mod.tau is not None:
            meta["tau"] = mod.tau
        meta.update(decay=mod.decay, decay_input=mod.decay_input, v_leak=mod.v_leak)
        if mod.decay == 1.0:
            raise UnsupportedOp("snn.lif with decay=1 has an infinite time constant; export it as snn.if")
        tau, r, v_leak = dt / (1.0 - mod.decay), mod.gain / (1.0 - mod.decay), mod.v_leak
    else:
        raise UnsupportedOp(f"{type(mod).__name__} has no NIR mapping")
    return nir.LIF(tau=_full(tau, shape), r=_full(r, shape), v_leak=_full(v_leak, shape), v_threshold=v_th,
                   v_reset=v_reset, metadata=meta)


def _differs_from_nir(mod) -> bool:
    return mod.reset_mode != "zero" or mod.compare == ">=" or mod.v_init != 0.0


def _const_mul_factor(node):
    """The constant of ``mul(x, c)`` (float or get_attr tensor), or None."""
    if node.op != "call_function" or node.target not in (operator.mul, torch.mul) or len(node.args) != 2:
        return None
    a, b = node.args
    if isinstance(b, fx.Node) and not isinstance(a, fx.Node):
        a, b = b, a
    if isinstance(b, (int, float)):
        return a, float(b)
    if isinstance(b, fx.Node) and b.op == "get_attr":
        owner, _, attr = b.target.rpartition(".")
        mod = node.graph.owning_module.get_submodule(owner) if owner else node.graph.owning_module
        return a, getattr(mod, attr)
    return None


class _Exporter:
    def __init__(self, gm, dt):
        self.gm, self.dt = gm, dt
        self.nodes, self.edges = {}, []
        self.sources = {}  # fx node -> list of NIR node names whose sum is its value
        self.inexact = []

    def add(self, fx_node, nir_node, srcs, name=None):
        name = name or str(fx_node.target if fx_node.op == "call_module" else fx_node.name)
        self.nodes[name] = nir_node
        for s in srcs:
            self.edges.append((s, name))
        self.sources[fx_node] = [name]

    def srcs(self, n):
        arg = n.args[0]
        if not isinstance(arg, fx.Node) or arg not in self.sources:
            raise UnsupportedOp(f"{node_ref(n)}: its input is not an exported value")
        return self.sources[arg]

    def shape(self, n):
        return tuple(info(n).shape[1:])

    def export_module(self, n, mod):
        import nir
        if not registry.has_hook(registry.lookup(self.gm, n), "nir_out"):
            self.unsupported(n)   # e.g. a subclass of LIF with its own update (ALIF, DSR) is not a NIR LIF
        srcs = self.srcs(n)
        if isinstance(mod, _PASS_THROUGH) and getattr(mod, "step_mode", "s") == "s":
            self.sources[n] = srcs
        elif isinstance(mod, nn.Linear):
            w = _np(mod.weight)
            node = nir.Affine(weight=w, bias=_np(mod.bias)) if mod.bias is not None else nir.Linear(weight=w)
            self.add(n, node, srcs)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            cls = nir.Conv2d if isinstance(mod, nn.Conv2d) else nir.Conv1d
            bias = _np(mod.bias) if mod.bias is not None else np.zeros(mod.out_channels, np.float32)
            pad = mod.padding if isinstance(mod.padding, str) else tuple(mod.padding)
            kw = {"input_shape": tuple(info(n.args[0]).shape[2:])}
            if cls is nir.Conv1d:
                kw = {"input_shape": info(n.args[0]).shape[2]}
                pad = pad if isinstance(pad, str) else pad[0]
            self.add(n, cls(weight=_np(mod.weight), stride=mod.stride if cls is nir.Conv2d else mod.stride[0],
                            padding=pad, dilation=mod.dilation if cls is nir.Conv2d else mod.dilation[0],
                            groups=mod.groups, bias=bias, **kw), srcs)
        elif isinstance(mod, nn.Flatten):
            self.flatten(n, mod.start_dim, mod.end_dim, srcs)
        elif isinstance(mod, nn.AvgPool2d):
            self.avg_pool(n, mod, srcs)
        elif isinstance(mod, (IF, LIF, ParametricLIF)):
            if mod.step_mode != "s":
                raise UnsupportedOp(f"{node_ref(n)}: multi-step neuron; export the per-step graph (before unroll_timesteps)")
            if _differs_from_nir(mod):
                self.inexact.append(str(n.target))
            self.add(n, _neuron(mod, self.shape(n), self.dt), srcs)
        else:
            self.unsupported(n)

    def flatten(self, n, start, end, srcs):
        import nir
        if start == 0:
            raise UnsupportedOp(f"{node_ref(n)}: flatten over the batch dimension has no NIR form")
        unshift = lambda d: d - 1 if d > 0 else d
        self.add(n, nir.Flatten(input_type={"input": np.array(info(n.args[0]).shape[1:])},
                                start_dim=unshift(start), end_dim=unshift(end)), srcs)

    def avg_pool(self, n, mod, srcs):
        import nir
        pair = lambda v: np.array(v if isinstance(v, (tuple, list)) else (v, v))
        k, stride = pair(mod.kernel_size), pair(mod.stride if mod.stride is not None else mod.kernel_size)
        users = list(n.users)
        fac = _const_mul_factor(users[0]) if len(users) == 1 else None
        if fac is not None and isinstance(fac[1], float) and fac[1] == float(k[0] * k[1]) and mod.count_include_pad \
                and mod.divisor_override is None:
            self.add(users[0], nir.SumPool2d(kernel_size=k, stride=stride, padding=pair(mod.padding)), srcs,
                     name=str(n.target))
            self.sources[n] = None  # consumed by the SumPool2d
        else:
            self.add(n, nir.AvgPool2d(kernel_size=k, stride=stride, padding=pair(mod.padding)), srcs)

    def export_function(self, n):
        import nir
        if n in self.sources:  # the mul of a SumPool2d, already written
            return
        if n.target in (operator.add, torch.add) and all(isinstance(a, fx.Node) for a in n.args[:2]):
            self.sources[n] = [s for a in n.args[:2] for s in self.sources[a]]
            return
        fac = _const_mul_factor(n)
        if fac is not None:
            x, c = fac
            self.add(n, nir.Scale(scale=_full(c, self.shape(n))), self.sources[x])
        elif n.target is torch.flatten or (n.op == "call_method" and n.target == "flatten"):
            start = n.args[1] if len(n.args) > 1 else n.kwargs.get("start_dim", 0)
            end = n.args[2] if len(n.args) > 2 else n.kwargs.get("end_dim", -1)
            self.flatten(n, start, end, self.srcs(n))
        else:
            self.unsupported(n)

    def unsupported(self, n):
        raise UnsupportedOp(f"{node_ref(n)}: op {op_name(self.gm, n)} has no NIR mapping; supported: "
                            + ", ".join(supported_ops()))


def to_nir(gm: fx.GraphModule, dt: float = 1.0, path=None, overwrite: bool = False):
    """Export per-step graph ``gm`` to a ``nir.NIRGraph``; with ``path``, also write it there
    (atomically; an existing file is kept unless ``overwrite``). ``dt`` is the time step in the
    unit the NIR time constants should have (1.0: tau in steps)."""
    try:
        import nir
    except ImportError:
        raise SnncError("NIR support needs the 'nir' package: pip install nir") from None
    from .printer import dump
    spec = graph_spec(gm)
    if spec.get("T") or spec["layout"] != "step":
        raise UnsupportedOp("to_nir exports per-step graphs (NIR has no time axis); export the graph before "
                            "unroll_timesteps")
    if not dt > 0:
        raise SnncError(f"to_nir: dt must be > 0, got {dt!r}")
    dump(gm)  # annotates the graph if it has no metadata yet
    ex = _Exporter(gm, float(dt))
    outputs = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            name = f"input_{n.name}" if len(spec["inputs"]) > 1 else "input"
            ex.add(n, nir.Input(input_type={"input": np.array(info(n).shape[1:])}), [], name=name)
        elif n.op == "call_module":
            ex.export_module(n, gm.get_submodule(n.target))
        elif n.op in ("call_function", "call_method"):
            ex.export_function(n)
        elif n.op == "get_attr":
            continue
        elif n.op == "output":
            outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else [n.args[0]]
            for i, o in enumerate(outs):
                name = "output" if len(outs) == 1 else f"output_{i}"
                outputs.append((name, o))
    for name, o in outputs:
        if not isinstance(o, fx.Node) or o not in ex.sources:
            raise UnsupportedOp(f"graph output {o} is not an exported value")
        ex.nodes[name] = nir.Output(output_type={"output": np.array(info(o).shape[1:])})
        ex.edges += [(s, name) for s in ex.sources[o]]
    graph = nir.NIRGraph(nodes=ex.nodes, edges=ex.edges, metadata={"dt": float(dt), "writer": "snnc"})
    if ex.inexact:
        warnings.warn("to_nir: neurons " + ", ".join(ex.inexact) + " reset by subtraction, compare with '>=' or "
                      "start from v_init != 0; NIR's standard fields cannot say that (the exact snnc neuron is in "
                      "the node metadata, which snnc.from_nir reads; other NIR readers will differ)", stacklevel=2)
    if path is not None:
        atomic_write(path, lambda tmp: nir.write(tmp, graph), overwrite=overwrite)
    return graph
