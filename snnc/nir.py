"""NIR import: ``snnc.from_nir(graph_or_path, dt=...)`` -> a per-step spiking-IR graph.

NIR (the Neuromorphic Intermediate Representation, Pedersen et al., Nat. Commun. 2024) describes
neurons in continuous time. snnc's IR is discrete (one call = one time step), so the import fixes
a discretisation; it is the forward-Euler step that norse and the NIR paper's reference use:

    NIR LIF      tau dv/dt = (v_leak - v) + r I
    snnc         H[t] = v_leak + decay (V[t-1] - v_leak) + gain X[t]
                 decay = 1 - dt/tau,  gain = r dt/tau
                 r = 1      -> snn.lif {decay, decay_input=true, v_leak}  (gain = 1 - decay; norse,
                               sinabs, spikingjelly with decay_input)
                 r = tau/dt -> snn.lif {decay, v_leak}  (gain = 1; snntorch's Leaky export)
                 otherwise  -> ``mul(x, gain)`` then snn.lif {decay, v_leak}
    NIR IF       dv/dt = r I   ->  H[t] = V[t-1] + (dt r) X[t]: snn.if, preceded by ``mul(x, dt r)``
                 unless dt r = 1. spikingjelly writes r = 1/dt; sinabs writes r = 1 and no time
                 constant anywhere, which reads right with the default dt = 1 for graphs without LIF
                 nodes (dt is required when the graph has a time constant).
    fire/reset   NIR: z = 1[v > v_threshold], then v = v_reset  ->  compare=">", reset="zero"

Per-neuron ``v_threshold`` arrays become a tensor ``v_th`` (reduced to a float or ``[C,1,1]``
when the values allow); per-neuron ``tau``, ``v_leak`` or ``v_reset`` that differ between neurons
have no snnc form and raise ``UnsupportedOp``. ``CubaLIF`` (two state variables: a synaptic
current and a membrane) and recurrent (cyclic) graphs are rejected by name: snnc's neurons have
one state variable and its per-step graphs are feed-forward.

Other nodes: Affine/Linear -> nn.linear, Conv1d/Conv2d -> nn.conv, Flatten -> nn.flatten
(NIR shapes carry no batch dimension, so dims shift by one), AvgPool2d -> nn.avg_pool2d,
SumPool2d -> nn.avg_pool2d followed by ``mul(k_h*k_w)``, Scale -> ``mul``, Input/Output ->
graph inputs/outputs; several edges into one node are summed (NIR's fan-in rule).

Graphs written by ``snnc.to_nir`` carry the exact snnc neuron in the node's ``metadata``
(``snnc_op``, ``decay``, ``reset``, ``compare`` ...) and ``dt`` in the graph's metadata; the
import prefers them, which makes snnc -> NIR -> snnc exact even where NIR's semantics (hard reset,
strict compare) differ from the snnc neuron's. See ``snnc/nir_export.py``.
"""
from __future__ import annotations

import keyword
import math
import operator
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from .errors import FileFormatError, SnncError, UnsupportedOp
from .fileio import require_file
from .ops import IF, LIF, ParametricLIF

SUPPORTED_NODES = ("Input", "Output", "Affine", "Linear", "Conv1d", "Conv2d", "Flatten", "SumPool2d",
                   "AvgPool2d", "Scale", "IF", "LIF")


def _nir():
    try:
        import nir
    except ImportError:
        raise SnncError("NIR support needs the 'nir' package: pip install nir") from None
    return nir


# Bounds on what a NIR file may ask for: weights read into memory, and the elements of one input.
MAX_NIR_BYTES = 2 << 30
MAX_INPUT_ELEMENTS = 1 << 28


def _check_hdf5(path) -> None:
    """Refuse what would make h5py read outside the file or allocate without bound, before
    ``nir.read`` touches the data: external links, external / virtual dataset storage (HDF5 reads
    any path they name), and datasets larger in total than ``MAX_NIR_BYTES`` (a compressed
    dataset can expand 1000x)."""
    import h5py
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise FileFormatError(f"{path} is not a readable NIR file (not HDF5, or truncated): {e}") from None
    total = 0
    with f:
        todo = [("", f)]
        while todo:
            prefix, group = todo.pop()
            for key in group.keys():
                name = f"{prefix}/{key}"
                link = group.get(key, getlink=True)
                if isinstance(link, (h5py.ExternalLink, h5py.SoftLink)):
                    raise FileFormatError(f"{path}: {name} is a link to {getattr(link, 'filename', '') or link.path!r}; "
                                          "snnc reads NIR files without links")
                obj = group.get(key)
                if isinstance(obj, h5py.Group):
                    todo.append((name, obj))
                elif isinstance(obj, h5py.Dataset):
                    if obj.external or obj.is_virtual:
                        raise FileFormatError(f"{path}: dataset {name} keeps its data in other files "
                                              "(HDF5 external/virtual storage); snnc refuses to read them")
                    total += int(obj.size or 0) * obj.dtype.itemsize
                    if total > MAX_NIR_BYTES:
                        raise FileFormatError(f"{path}: datasets up to {name} hold more than {MAX_NIR_BYTES >> 20} MiB; "
                                              "snnc refuses NIR files this large")


def _read(graph_or_path):
    nir = _nir()
    if isinstance(graph_or_path, nir.NIRGraph):
        return graph_or_path
    path = require_file(Path(graph_or_path), "NIR file")
    _check_hdf5(path)
    try:
        return nir.read(path)
    except ValueError as e:
        if "type" not in str(e).lower():
            raise FileFormatError(f"{path} is not a readable NIR file: {e}") from None
        first = e  # NIR's own type inference rejects some published files (e.g. rockpool's Output
    except Exception as e:  # shape [1,1,1] after a [1] neuron); snnc re-infers shapes itself
        raise FileFormatError(f"{path} is not a readable NIR file: {type(e).__name__}: {e}") from None
    try:
        return nir.read(path, type_check=False)
    except Exception as e:
        raise FileFormatError(f"{path} is not a readable NIR file: {first}; {type(e).__name__}: {e}") from None


def _arr(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float64) if not isinstance(v, np.ndarray) else v.astype(np.float64)


def _meta(node) -> dict:
    """Node metadata with h5py's bytes/0-d arrays turned into plain Python values."""
    out = {}
    for k, v in (getattr(node, "metadata", None) or {}).items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.ndarray) and v.ndim == 0:
            v = v.item()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def _uniform(name, what, values: np.ndarray) -> float:
    if values.size and not np.all(values == values.flat[0]):
        raise UnsupportedOp(f"NIR node '{name}': per-neuron {what} values differ "
                            f"(min {values.min():g}, max {values.max():g}); snnc neurons take one {what}")
    return float(values.flat[0]) if values.size else 0.0


def threshold_value(v_th: np.ndarray):
    """A float if all neurons share it, ``[C,1,1]`` if it only varies by channel, else the array."""
    v_th = np.asarray(v_th, dtype=np.float32)
    if v_th.size == 0 or np.all(v_th == v_th.flat[0]):
        return float(v_th.flat[0]) if v_th.size else 1.0
    if v_th.ndim == 3 and np.all(v_th == v_th[:, :1, :1]):
        return torch.from_numpy(v_th[:, :1, :1].copy())
    return torch.from_numpy(v_th.copy())


def _neuron_kwargs(meta: dict) -> dict:
    """The snnc-only neuron options ``to_nir`` wrote into the metadata (else NIR's own)."""
    kw = {"reset": meta.get("reset", "zero"), "compare": meta.get("compare", ">")}
    if "v_init" in meta:
        kw["v_init"] = float(meta["v_init"])
    return kw


def _input_gain(gain: np.ndarray, one: float):
    """The factor to multiply the input by before a neuron whose own gain is ``one``, or ``None``
    when every neuron's ``gain`` equals it (up to the float32 rounding of the NIR file)."""
    return None if np.allclose(gain, one, rtol=1e-6, atol=0.0) else gain / one


def _if(name, node, dt, meta):
    """IF: forward Euler of dv/dt = r I is H = V + (dt r) X; dt defaults to 1 for graphs
    without time constants (sinabs writes r = 1 meaning one input per step; spikingjelly writes
    r = 1/dt)."""
    v_reset = _uniform(name, "v_reset", _arr(node.v_reset))
    m = IF(v_th=threshold_value(node.v_threshold), v_reset=v_reset, **_neuron_kwargs(meta))
    if meta.get("snnc_op") == "snn.if":
        return m, None
    return m, _input_gain((1.0 if dt is None else dt) * _arr(node.r), 1.0)


def _lif(name, node, dt, meta):
    v_th = threshold_value(node.v_threshold)
    kw = dict(v_reset=_uniform(name, "v_reset", _arr(node.v_reset)), **_neuron_kwargs(meta))
    op = meta.get("snnc_op")
    if op == "snn.plif":  # written by to_nir: w restores the trainable time constant exactly
        m = ParametricLIF(v_leak=float(meta.get("v_leak", 0.0)), v_th=v_th, **kw)
        with torch.no_grad():
            m.w.fill_(float(meta["w"]))
        return m, None
    if op == "snn.lif":
        lif_kw = {"tau": float(meta["tau"])} if "tau" in meta else {"decay": float(meta["decay"])}
        m = LIF(decay_input=bool(meta.get("decay_input", False)), v_leak=float(meta.get("v_leak", 0.0)),
                v_th=v_th, **lif_kw, **kw)
        return m, None
    if dt is None:
        raise SnncError(f"NIR node '{name}' (LIF) has a time constant: pass dt= (the simulation step, in "
                        "the unit of tau) to snnc.from_nir (--dt on the command line)")
    tau = _uniform(name, "tau", _arr(node.tau))
    if not tau > dt:
        raise UnsupportedOp(f"NIR node '{name}' (LIF): tau={tau:g} <= dt={dt:g}; forward Euler needs tau > dt")
    decay, gain = 1.0 - dt / tau, _arr(node.r) * dt / tau
    v_leak = _uniform(name, "v_leak", _arr(node.v_leak))
    if _input_gain(gain, dt / tau) is None:      # r = 1: spikingjelly's decay_input form
        return LIF(decay=decay, decay_input=True, v_leak=v_leak, v_th=v_th, **kw), None
    m = LIF(decay=decay, v_leak=v_leak, v_th=v_th, **kw)  # gain 1 (snntorch's r = tau/dt), else scale
    return m, _input_gain(gain, 1.0)


def _conv(node, dims):
    w = torch.from_numpy(np.asarray(node.weight, dtype=np.float32).copy())
    cls = nn.Conv2d if dims == 2 else nn.Conv1d
    pad = node.padding if isinstance(node.padding, str) else tuple(int(p) for p in np.atleast_1d(node.padding))
    m = cls(w.shape[1] * int(node.groups), w.shape[0], tuple(w.shape[2:]),
            stride=tuple(int(s) for s in np.atleast_1d(node.stride)), padding=pad,
            dilation=tuple(int(d) for d in np.atleast_1d(node.dilation)), groups=int(node.groups))
    with torch.no_grad():
        m.weight.copy_(w)
        m.bias.copy_(torch.from_numpy(np.broadcast_to(np.asarray(node.bias, dtype=np.float32), (w.shape[0],)).copy()))
    return m


def _linear(node, bias):
    w = torch.from_numpy(np.asarray(node.weight, dtype=np.float32).copy())
    m = nn.Linear(w.shape[1], w.shape[0], bias=bias)
    with torch.no_grad():
        m.weight.copy_(w)
        if bias:
            m.bias.copy_(torch.from_numpy(np.broadcast_to(np.asarray(node.bias, dtype=np.float32), (w.shape[0],)).copy()))
    return m


def _pair(v):
    return tuple(int(i) for i in np.broadcast_to(np.atleast_1d(v), (2,)))


def _toposort(g) -> list[str]:
    preds = {k: [] for k in g.nodes}
    for src, dst in g.edges:
        for end in (src, dst):
            if end not in g.nodes:
                raise FileFormatError(f"NIR edge ({src!r}, {dst!r}) names unknown node {end!r}")
        preds[dst].append(src)
    order, state = [], {}

    def visit(k, path):
        if state.get(k) == "done":
            return
        if state.get(k) == "open":
            cycle = path[path.index(k):] + [k]
            raise UnsupportedOp("NIR graph has a recurrent connection (cycle " + " -> ".join(cycle) +
                                "); snnc's per-step graphs are feed-forward (state lives only in neurons)")
        state[k] = "open"
        for p in preds[k]:
            visit(p, path + [k])
        state[k] = "done"
        order.append(k)

    for k in sorted(g.nodes):
        visit(k, [])
    return order, preds


class _Builder:
    """Builds the fx graph node by node; NIR names become submodule names."""

    def __init__(self):
        self.root = nn.Module()
        self.graph = fx.Graph()
        self.names = set()

    def module(self, nir_name, mod, arg):
        name = "".join(c if c.isalnum() or c == "_" else "_" for c in str(nir_name))
        if not name or name[0].isdigit() or keyword.iskeyword(name) or hasattr(self.root, name):
            name = f"n{name}"  # "if" (nir's default name for an IF node) or "forward" cannot be attributes
        base, i = name, 1
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        self.root.add_module(name, mod)
        return self.graph.call_module(name, (arg,))

    def scale(self, nir_name, arg, values: np.ndarray, sample_shape):
        """``arg * values``: a float when uniform, else a buffer shaped like one sample."""
        values = np.asarray(values, dtype=np.float32)
        if values.size == 0 or np.all(values == values.flat[0]):
            return arg if values.size == 0 or values.flat[0] == 1.0 else \
                self.graph.call_function(operator.mul, (arg, float(values.flat[0])))
        name = f"{self.module_name(nir_name)}_scale"
        t = torch.from_numpy(np.broadcast_to(values, sample_shape).copy()) if sample_shape else torch.from_numpy(values.copy())
        self.root.register_buffer(name, t)
        return self.graph.call_function(operator.mul, (arg, self.graph.get_attr(name)))

    def module_name(self, nir_name):
        return "".join(c if c.isalnum() or c == "_" else "_" for c in f"n{nir_name}")


def _out_shape(node):
    t = getattr(node, "output_type", None) or {}
    s = t.get("output")
    return None if s is None else tuple(int(i) for i in np.atleast_1d(s))


def from_nir(graph_or_path, dt: float | None = None) -> fx.GraphModule:
    """Import a NIR graph (a ``nir.NIRGraph`` or a ``.nir`` file) as a per-step spiking-IR graph.

    ``dt`` is the simulation time step in the unit of the graph's time constants; it is needed only
    for nodes with a time constant (LIF), and defaults to the ``dt`` that ``snnc.to_nir`` stored in
    the graph's metadata. Run the result with ``snnc.run(gm, x_seq, T)`` on ``[T, N, ...]`` inputs.
    """
    from .ir import annotate, make_spec
    from .verifier import verify
    nir = _nir()
    g = _read(graph_or_path)
    if dt is None and "dt" in _meta(g):
        dt = float(_meta(g)["dt"])
    order, preds = _toposort(g)
    b = _Builder()
    values, inputs, outputs = {}, [], []
    for name in order:
        node = g.nodes[name]
        kind = type(node).__name__
        if isinstance(node, nir.Input):
            shape = tuple(int(i) for i in np.atleast_1d(node.input_type["input"]))
            if any(d < 1 for d in shape) or math.prod(shape) > MAX_INPUT_ELEMENTS:
                raise FileFormatError(f"NIR input '{name}' has shape {list(shape)}: every dim must be >= 1 and "
                                      f"the input at most {MAX_INPUT_ELEMENTS} elements")
            values[name] = b.graph.placeholder(b.module_name(name))
            inputs.append(shape)
            continue
        srcs = [values[p] for p in preds[name]]
        if not srcs:
            raise FileFormatError(f"NIR node '{name}' ({kind}) has no incoming edge")
        x = srcs[0]
        for s in srcs[1:]:  # NIR sums every edge that enters a node
            x = b.graph.call_function(operator.add, (x, s))
        meta = _meta(node)
        if isinstance(node, nir.Output):
            outputs.append(x)
            continue
        if isinstance(node, nir.Affine):
            values[name] = b.module(name, _linear(node, bias=True), x)
        elif isinstance(node, nir.Linear):
            values[name] = b.module(name, _linear(node, bias=False), x)
        elif isinstance(node, (nir.Conv2d, nir.Conv1d)):
            values[name] = b.module(name, _conv(node, 2 if isinstance(node, nir.Conv2d) else 1), x)
        elif isinstance(node, nir.Flatten):
            shift = lambda d: int(d) + 1 if int(d) >= 0 else int(d)  # NIR shapes have no batch dim
            values[name] = b.module(name, nn.Flatten(shift(node.start_dim), shift(node.end_dim)), x)
        elif isinstance(node, (nir.SumPool2d, nir.AvgPool2d)):
            k = _pair(node.kernel_size)
            pool = b.module(name, nn.AvgPool2d(k, _pair(node.stride), _pair(node.padding)), x)
            # sum = mean * k_h*k_w (count_include_pad: padded zeros count, as in a sum)
            values[name] = b.graph.call_function(operator.mul, (pool, float(k[0] * k[1]))) \
                if isinstance(node, nir.SumPool2d) else pool
        elif isinstance(node, nir.Scale):
            values[name] = b.scale(name, x, np.asarray(node.scale), _out_shape(node))
        elif isinstance(node, (nir.IF, nir.LIF)):
            neuron, gain = (_if if isinstance(node, nir.IF) else _lif)(name, node, dt, meta)
            if gain is not None:
                x = b.scale(f"{name}_r", x, gain, _out_shape(node))
            values[name] = b.module(name, neuron, x)
        elif isinstance(node, nir.CubaLIF):
            raise UnsupportedOp(f"NIR node '{name}' (CubaLIF) has two state variables (synaptic current and "
                                "membrane); snnc neurons have one. Supported NIR nodes: " + ", ".join(SUPPORTED_NODES))
        else:
            raise UnsupportedOp(f"NIR node '{name}' ({kind}) has no snnc mapping; supported NIR nodes: "
                                + ", ".join(SUPPORTED_NODES))
    if not inputs or not outputs:
        raise FileFormatError(f"NIR graph needs an Input and an Output node; it has {len(inputs)} and {len(outputs)}")
    b.graph.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    gm = fx.GraphModule(b.root, b.graph, class_name="NIRGraph")
    example = [torch.zeros((1, *s)) for s in inputs]
    gm.snnc_spec = make_spec(example)
    try:
        annotate(gm, example)
    except SnncError as e:
        raise FileFormatError(f"NIR graph does not run with input shapes {[list(s) for s in inputs]}: {e}") from None
    return verify(gm)


def to_nir(gm, dt: float = 1.0, path=None, overwrite: bool = False):
    """Export a per-step spiking-IR graph to NIR (see ``snnc/nir_export.py``)."""
    from .nir_export import to_nir as _to_nir
    return _to_nir(gm, dt=dt, path=path, overwrite=overwrite)
