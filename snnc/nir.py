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

    NIR CubaLIF  tau_syn dI/dt = -I + w_in X, then LIF on I  ->  snn.current_lif {alpha = 1 - dt/tau_syn,
                 beta = 1 - dt/tau_mem, gain_in = (w_in dt/tau_syn)(r dt/tau_mem)} (the two gains
                 multiply: I is linear in X); CubaLI / LI / I -> snn.current_li (no fire; LI: alpha = 0,
                 I: beta = 1 too); Delay -> snn.delay (delay/dt whole steps). ``snnc/nir_neurons.py``.
    cycles       a recurrent edge carries the previous step's output: each cycle must pass through one
                 neuron and otherwise be a chain of weights (neuron -> w_rec -> neuron, the NIR paper's
                 Braille graphs), which becomes ``snn.feedback(neuron, w_rec)``; others are refused by name.

Per-neuron ``v_threshold`` arrays become a tensor ``v_th`` (reduced to a float or ``[C,1,1]``
when the values allow); per-neuron ``tau``, ``v_leak`` or ``v_reset`` that differ between neurons
have no snnc form and raise ``UnsupportedOp``; per-neuron input gains become a ``mul`` first.

NIR's fields do not say every writer's semantics: sinabs writes its IAF (MultiSpike,
MembraneSubtract) as a plain IF, snntorch its Leaky/Synaptic (reset by subtraction one step late)
as LIF/CubaLIF with reset to v_reset. ``from_nir`` recognises those writers' signatures and warns
naming the nodes; ``reset=`` makes every neuron not described exactly use another reset
(``"subtract_after_leak"``: snntorch's default).

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
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from .errors import FileFormatError, SnncError, UnsupportedOp
from .fileio import require_file
from .nir_graph import fold_cycles, inline_subgraphs, toposort
from .nir_neurons import foreign_semantics, mappings, meta as _meta, threshold_value  # noqa: F401
from .ops import Feedback

SUPPORTED_NODES = ("Input", "Output", "Affine", "Linear", "Conv1d", "Conv2d", "Flatten", "SumPool2d",
                   "AvgPool2d", "Scale", "IF", "LIF", "CubaLIF", "LI", "CubaLI", "I", "Delay")


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


def _path_module(g, name):
    """The stateless module of a node on a recurrent path (weights: Affine, Linear, Conv)."""
    import nir
    node = g.nodes[name]
    if isinstance(node, nir.Affine):
        return _linear(node, bias=True)
    if isinstance(node, nir.Linear):
        return _linear(node, bias=False)
    if isinstance(node, (nir.Conv2d, nir.Conv1d)):
        return _conv(node, 2 if isinstance(node, nir.Conv2d) else 1)
    raise UnsupportedOp(f"NIR node '{name}' ({type(node).__name__}) on a recurrent path: snnc takes Affine, "
                        "Linear or Conv nodes there")


def from_nir(graph_or_path, dt: float | None = None, reset: str | None = None, warn: bool = True) -> fx.GraphModule:
    """Import a NIR graph (a ``nir.NIRGraph`` or a ``.nir`` file) as a per-step spiking-IR graph.

    ``dt`` is the simulation time step in the unit of the graph's time constants; it is needed only
    for nodes with a time constant (LIF, CubaLIF, LI, CubaLI), and defaults to the ``dt`` that
    ``snnc.to_nir`` stored in the graph's metadata. Run the result with ``snnc.run(gm, x_seq, T)`` on
    ``[T, N, ...]`` inputs. ``reset`` overrides NIR's reset-to-``v_reset`` for the spiking nodes the
    file does not describe exactly (not written by snnc): e.g. ``"subtract_after_leak"`` runs a graph
    written by ``snntorch.export_to_nir`` as snntorch runs its default ``Leaky``/``Synaptic``
    (reset by subtraction, one step late), which NIR's fields cannot say. ``warn=False`` silences
    the warnings, by node, about nodes whose writer (sinabs, snntorch) runs them otherwise than
    NIR's equations say.
    """
    from .ir import annotate, make_spec
    from .verifier import verify
    nir = _nir()
    g = inline_subgraphs(_read(graph_or_path), nir)
    if dt is None and "dt" in _meta(g):
        dt = float(_meta(g)["dt"])
    neurons = mappings(nir)
    edges, loops = fold_cycles(g, lambda node: type(node) in neurons)
    order, preds = toposort(g.nodes, edges)
    b = _Builder()
    values, inputs, outputs = {}, [], []
    in_loop = {w for chain in loops.values() for w in chain}
    for name in order:
        node = g.nodes[name]
        kind = type(node).__name__
        if name in in_loop:
            continue
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
        if reset is not None and "snnc_op" not in meta and "alpha" not in meta:
            meta["reset"] = reset
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
        elif type(node) in neurons:
            neuron, gain = neurons[type(node)](name, node, dt, meta)
            if name in loops:
                if gain is not None:
                    raise UnsupportedOp(f"NIR node '{name}' ({kind}): per-neuron input gains on a neuron with a "
                                        "recurrent connection have no snnc form")
                path = [_path_module(g, w) for w in loops[name]]
                neuron = Feedback(neuron, path[0] if len(path) == 1 else nn.Sequential(*path))
            elif gain is not None:
                x = b.scale(f"{name}_r", x, gain, _out_shape(node))
            values[name] = b.module(name, neuron, x)
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
    for msg in foreign_semantics(g, nir) if warn and reset is None else []:
        warnings.warn(msg + " (warn=False silences this)", stacklevel=2)
    return verify(gm)


def to_nir(gm, dt: float = 1.0, path=None, overwrite: bool = False):
    """Export a per-step spiking-IR graph to NIR (see ``snnc/nir_export.py``)."""
    from .nir_export import to_nir as _to_nir
    return _to_nir(gm, dt=dt, path=path, overwrite=overwrite)
