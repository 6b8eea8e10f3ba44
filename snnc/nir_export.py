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
from .ops import (IF, LIF, CurrentLI, CurrentLIF, Delay, DirectEncoder, Feedback, MergeTime, ParametricLIF,
                  Readout, SplitTime, registry)

# NIR has no time axis: per-step and multi-step forms of these ops are the same NIR node (none)
_PASS_THROUGH = (DirectEncoder, MergeTime, SplitTime, nn.Dropout, nn.Identity)
_QUALIFIED = {"mul": "mul (by a constant)"}


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


def _current(mod, shape, dt):
    """CurrentLIF -> CubaLIF, CurrentLI -> LI / I / CubaLI: the inverse of ``nir_neurons``'s
    alpha = 1 - dt/tau_syn, gain_in = w_in dt/tau_syn, beta = 1 - dt/tau_mem, gain = r dt/tau_mem."""
    import nir
    if not mod.scalar_params():
        raise UnsupportedOp(f"{mod.op_name} with per-neuron alpha/beta/v_th has no exact NIR form here; "
                            "give it one value each")
    meta = {"snnc_op": type(mod).op_name, "alpha": mod.alpha, "beta": mod.beta, "gain_in": mod.gain_in,
            "gain": mod.gain_mem, "v_leak": mod.v_leak, "v_init": mod.v_init}
    if mod.form == "euler":   # norse's operation order and float32 constants, restored exactly on import
        meta.update(form="euler", k_syn=mod.k_syn, k_mem=mod.k_mem, current=mod.current)
    if mod.alpha == 1.0:
        raise UnsupportedOp(f"{mod.op_name} with alpha=1 has an infinite synaptic time constant; NIR cannot write it")
    tau_syn, w_in = dt / (1.0 - mod.alpha), mod.gain_in / (1.0 - mod.alpha)
    v_leak = _full(mod.v_leak, shape)
    if isinstance(mod, CurrentLI):
        if mod.beta == 1.0:
            if mod.alpha != 0.0 or mod.v_leak != 0.0:
                raise UnsupportedOp("snn.current_li with beta=1 and a synaptic current has no NIR node")
            return nir.I(r=_full(mod.gain_in * mod.gain_mem / dt, shape), metadata=meta)
        tau_mem = dt / (1.0 - mod.beta)
        r = _full(mod.gain_mem / (1.0 - mod.beta), shape)
        if mod.alpha == 0.0 and mod.gain_in == 1.0:
            return nir.LI(tau=_full(tau_mem, shape), r=r, v_leak=v_leak, metadata=meta)
        return nir.CubaLI(tau_syn=_full(tau_syn, shape), tau_mem=_full(tau_mem, shape), r=r, v_leak=v_leak,
                          w_in=_full(w_in, shape), metadata=meta)
    if mod.beta == 1.0:
        raise UnsupportedOp("snn.current_lif with beta=1 has an infinite membrane time constant; NIR cannot write it")
    meta.update(reset=mod.reset_mode, compare=mod.compare)
    v_th, v_reset = _full(mod.v_th, shape), _full(mod.v_reset if mod.reset_mode == "zero" else 0.0, shape)
    return nir.CubaLIF(tau_syn=_full(tau_syn, shape), tau_mem=_full(dt / (1.0 - mod.beta), shape),
                       r=_full(mod.gain_mem / (1.0 - mod.beta), shape), v_leak=v_leak, v_threshold=v_th,
                       v_reset=v_reset, w_in=_full(w_in, shape), metadata=meta)


def _neuron(mod, shape, dt):
    """The NIR node for an snnc neuron over a batchless ``shape``, plus the exact snnc form."""
    import nir
    if isinstance(mod, (CurrentLIF, CurrentLI)):
        return _current(mod, shape, dt)
    meta = {"snnc_op": type(mod).op_name, "reset": mod.reset_mode, "compare": mod.compare}
    v_init = mod.v_init
    if isinstance(v_init, torch.Tensor):   # per-channel start (channel-wise conversion): NIR has no field
        if not bool((v_init == v_init.flatten()[0]).all()):
            raise UnsupportedOp(f"{type(mod).op_name} starts from a per-channel membrane (v_init of shape "
                                f"{list(v_init.shape)}); NIR has no initial-state field for it")
        v_init = float(v_init.flatten()[0])
    if v_init != 0.0:
        meta["v_init"] = v_init
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
    if isinstance(mod, CurrentLI):
        return mod.v_init != mod.v_leak
    v0 = mod.v_leak if isinstance(mod, CurrentLIF) else 0.0
    return mod.reset_mode != "zero" or mod.compare == ">=" or bool(torch.as_tensor(mod.v_init != v0).any())


def _sample_shape(n) -> tuple:
    i = info(n)
    return tuple(i.shape[2:] if getattr(i, "layout", "step") == "seq" else i.shape[1:])


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
        """One sample's shape (NIR shapes have neither batch nor time dimension)."""
        return _sample_shape(n)

    def export_module(self, n, mod):
        import nir
        if not registry.has_hook(registry.lookup(self.gm, n), "nir_out"):
            self.unsupported(n)   # e.g. a subclass of LIF with its own update (ALIF, DSR) is not a NIR LIF
        srcs = self.srcs(n)
        if isinstance(mod, _PASS_THROUGH):
            self.sources[n] = srcs
        elif isinstance(mod, nn.Linear):
            w = _np(mod.weight)
            node = nir.Affine(weight=w, bias=_np(mod.bias)) if mod.bias is not None else nir.Linear(weight=w)
            self.add(n, node, srcs)
        elif isinstance(mod, (nn.Conv1d, nn.Conv2d)):
            cls = nir.Conv2d if isinstance(mod, nn.Conv2d) else nir.Conv1d
            bias = _np(mod.bias) if mod.bias is not None else np.zeros(mod.out_channels, np.float32)
            pad = mod.padding if isinstance(mod.padding, str) else tuple(mod.padding)
            kw = {"input_shape": tuple(_sample_shape(n.args[0])[1:])}
            if cls is nir.Conv1d:
                kw = {"input_shape": _sample_shape(n.args[0])[1]}
                pad = pad if isinstance(pad, str) else pad[0]
            self.add(n, cls(weight=_np(mod.weight), stride=mod.stride if cls is nir.Conv2d else mod.stride[0],
                            padding=pad, dilation=mod.dilation if cls is nir.Conv2d else mod.dilation[0],
                            groups=mod.groups, bias=bias, **kw), srcs)
        elif isinstance(mod, nn.Flatten):
            self.flatten(n, mod.start_dim, mod.end_dim, srcs)
        elif isinstance(mod, nn.AvgPool2d):
            self.avg_pool(n, mod, srcs)
        elif isinstance(mod, Feedback):
            self.feedback(n, mod, srcs)
        elif isinstance(mod, (IF, LIF, ParametricLIF)):   # per-step or multi-step: the same NIR neuron
            if _differs_from_nir(mod):
                self.inexact.append(str(n.target))
            try:
                self.add(n, _neuron(mod, self.shape(n), self.dt), srcs)
            except UnsupportedOp as e:
                raise UnsupportedOp(f"{node_ref(n)}: {e}") from None
        elif isinstance(mod, Delay):
            self.add(n, nir.Delay(delay=_full(mod.steps * self.dt, self.shape(n))), srcs)
        else:
            self.unsupported(n)

    def feedback(self, n, mod, srcs):
        """``Feedback(neuron, path)`` -> the neuron node plus its recurrent path, with the cycle
        ``neuron -> path -> neuron`` as NIR edges (NIR's recurrence)."""
        import nir
        name = str(n.target)
        if not isinstance(mod.neuron, (IF, LIF, ParametricLIF, CurrentLIF, CurrentLI)):
            self.unsupported(n)
        if _differs_from_nir(mod.neuron):
            self.inexact.append(name)
        self.add(n, _neuron(mod.neuron, self.shape(n), self.dt), srcs)
        layers = list(mod.path) if isinstance(mod.path, nn.Sequential) else [mod.path]
        prev = name
        for i, layer in enumerate(layers):
            if not isinstance(layer, nn.Linear):
                raise UnsupportedOp(f"{node_ref(n)}: recurrent path layer {type(layer).__name__} has no NIR mapping "
                                    "here (nn.Linear only)")
            w = _np(layer.weight)
            node = nir.Affine(weight=w, bias=_np(layer.bias)) if layer.bias is not None else nir.Linear(weight=w)
            key = f"{name}.w_rec" if len(layers) == 1 else f"{name}.w_rec{i}"
            self.nodes[key] = node
            self.edges.append((prev, key))
            prev = key
        self.edges.append((prev, name))

    def flatten(self, n, start, end, srcs):
        import nir
        if start == 0:
            raise UnsupportedOp(f"{node_ref(n)}: flatten over the batch dimension has no NIR form")
        unshift = lambda d: d - 1 if d > 0 else d
        self.add(n, nir.Flatten(input_type={"input": np.array(_sample_shape(n.args[0]))},
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


def _folded(gm):
    """``gm`` with every BatchNorm after a conv/linear folded into its weights (a copy; the user's
    graph is kept). NIR has no BatchNorm node; in eval mode the fold is exact (Ioffe 2015, eq. after
    Alg. 1: y = gamma (x - mu) / sqrt(var + eps) + beta is affine)."""
    if not any(op_name(gm, n) == "nn.batch_norm" for n in gm.graph.nodes):
        return gm
    from .passes import fold_bn
    try:
        return fold_bn(gm)   # works on a copy
    except SnncError as e:
        raise UnsupportedOp(f"to_nir: NIR has no BatchNorm node, and {e}") from None


def to_nir(gm: fx.GraphModule, dt: float = 1.0, path=None, overwrite: bool = False):
    """Export spiking-IR graph ``gm`` (per-step, or multi-step / unrolled: NIR has no time axis, so
    both give the same per-step NIR graph) to a ``nir.NIRGraph``; with ``path``, also write it there
    (atomically; an existing file is kept unless ``overwrite``). ``dt`` is the time step in the
    unit the NIR time constants should have (1.0: tau in steps).

    BatchNorm is folded into the preceding conv/linear (on a copy). A final ``snn.readout`` (an
    average or last value over T) has no NIR node: the NIR graph outputs the readout's per-step
    input, and a ``UserWarning`` says so (average the NIR outputs over time to get snnc's result)."""
    try:
        import nir
    except ImportError:
        raise SnncError("NIR support needs the 'nir' package: pip install nir") from None
    from .printer import dump
    if not dt > 0:
        raise SnncError(f"to_nir: dt must be > 0, got {dt!r}")
    spec = graph_spec(gm)
    dump(gm)  # annotates the graph if it has no metadata yet
    gm = _folded(gm)
    dump(gm)
    ex = _Exporter(gm, float(dt))
    outputs, readouts = [], []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            name = f"input_{n.name}" if len(spec["inputs"]) > 1 else "input"
            ex.add(n, nir.Input(input_type={"input": np.array(_sample_shape(n))}), [], name=name)
        elif n.op == "call_module" and isinstance(gm.get_submodule(n.target), Readout) and \
                all(u.op == "output" for u in n.users):
            readouts.append(f"{n.target} (mode={gm.get_submodule(n.target).mode})")
            ex.sources[n] = ex.srcs(n)
            ex.shapes = getattr(ex, "shapes", {})
            ex.shapes[n] = _sample_shape(n.args[0])
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
        shape = getattr(ex, "shapes", {}).get(o) or _sample_shape(o)
        ex.nodes[name] = nir.Output(output_type={"output": np.array(shape)})
        ex.edges += [(s, name) for s in ex.sources[o]]
    meta = {"dt": float(dt), "writer": "snnc"}
    if spec.get("T"):
        meta["T"] = int(spec["T"])
    if readouts:
        meta["readout"] = ", ".join(readouts)
        warnings.warn("to_nir: readout " + ", ".join(readouts) + " (a reduction over time steps) has no NIR node; the "
                      "NIR graph outputs its per-step input: average the NIR outputs over time (mode=membrane / "
                      "spike_count) to get snnc's result", stacklevel=3)
    graph = nir.NIRGraph(nodes=ex.nodes, edges=ex.edges, metadata=meta)
    if ex.inexact:
        warnings.warn("to_nir: neurons " + ", ".join(ex.inexact) + " reset by subtraction, compare with '>=' or "
                      "start from v_init != 0; NIR's standard fields cannot say that (the exact snnc neuron is in "
                      "the node metadata, which snnc.from_nir reads; other NIR readers will differ)", stacklevel=3)
    if path is not None:
        atomic_write(path, lambda tmp: nir.write(tmp, graph), overwrite=overwrite)
    return graph
