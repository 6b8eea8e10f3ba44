"""Reference semantics: running a spiking-IR graph in torch eager, resetting state, saving graphs."""
from __future__ import annotations

import torch
from torch import fx, nn

from .errors import FileFormatError, InputError
from .fileio import is_bundle, read_bundle, require_file, write_bundle
from .ir import graph_spec, install_call_check
from .ops import Readout, reset


def _ends_in_readout(gm: fx.GraphModule) -> bool:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    src = out.args[0]
    return (isinstance(src, fx.Node) and src.op == "call_module"
            and isinstance(gm.get_submodule(src.target), Readout))


def run(gm: nn.Module, inputs, T: int | None = None, sequence: bool | None = None):
    """Run the reference interpreter from a reset state.

    * multi-step graph (after ``unroll_timesteps``): one call, returns the graph's output.
    * per-step graph: ``T`` calls. An input with one more leading dim than the graph's input spec
      is read as ``[T, N, ...]`` and fed step by step; otherwise the same input is fed each step.
      Returns the last output if the graph ends in a readout, else the outputs stacked ``[T, ...]``.

    ``sequence`` says it explicitly (``True``: every input is ``[T, N, ...]``; ``False``: every
    input is one step, fed at each step). Left ``None``, an input that could be either is refused
    naming both shapes: one with the graph's rank whose leading dim is T while the graph's first
    sample dim is 1 (a NIR graph of shape ``[1, F]``, say: ``[T, 1, F]`` is a batch of T or T steps
    of a one-sample batch with the batch dim left out).
    """
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    inputs = quantize_float_inputs(gm, inputs)
    spec = graph_spec(gm) if hasattr(gm, "snnc_spec") else {"layout": "step", "inputs": None}
    reset(gm)
    with torch.no_grad():
        if spec.get("T") or T is None:
            out = gm(*inputs)
            reset(gm)
            return out
        shapes = [list(s) for s, _ in spec["inputs"]] if spec["inputs"] else [list(x.shape) for x in inputs]
        per_step = _per_step(inputs, shapes, T, sequence)
        for x, ps in zip(inputs, per_step):
            if ps and x.shape[0] != T:
                raise InputError(f"input of shape {list(x.shape)} has {x.shape[0]} time steps, T={T}")
        outs = [gm(*[x[t] if ps else x for x, ps in zip(inputs, per_step)]) for t in range(T)]
    reset(gm)
    if _ends_in_readout(gm):
        return outs[-1]
    if isinstance(outs[0], (tuple, list)):  # e.g. a neuron reporting (spikes, membrane)
        return tuple(torch.stack([o[i] for o in outs]) for i in range(len(outs[0])))
    return torch.stack(outs)


def _per_step(inputs, shapes, T, sequence) -> list:
    """For each input: is it ``[T, N, ...]`` (fed step by step) or one step (fed every step)?"""
    out = []
    for k, (x, want) in enumerate(zip(inputs, shapes)):
        r, got = len(want), list(x.shape)
        where = f"input {k} of shape {got} (the graph takes one step of shape {want})"
        if sequence is True and x.dim() != r + 1:
            raise InputError(f"{where}: sequence=True needs [T, N, ...] with {r + 1} dims")
        if sequence is False and x.dim() != r:
            raise InputError(f"{where}: sequence=False needs one step with {r} dims")
        if sequence is None and x.dim() == r and T > 1 and r > 1 and got[0] == T and want[1] == 1 \
                and got[1:] == want[1:]:
            raise InputError(f"{where} with T={T} is ambiguous: a batch of {T} fed at every step, or {T} steps "
                             f"of a batch whose dim was left out? Pass sequence=False for the first, or "
                             f"x.unsqueeze(1) (shape {[T, 1, *got[1:]]}) / sequence=True for the second")
        out.append(x.dim() == r + 1 if sequence is None else sequence)
    return out


def leaves(v) -> list:
    """The tensors of a (nested tuple / list) model output, in order: how a graph's outputs and a
    framework's outputs are compared one for one."""
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (tuple, list)):
        return [t for e in v for t in leaves(e)]
    return []


def quantize_float_inputs(gm, inputs: list) -> list:
    """An integer graph (``quantize_integer``) takes int8; float inputs are quantized with the
    graph's input scale, exactly as the ``tvm:int`` module does on the host, so both give the
    same outputs for the same data."""
    meta = getattr(gm, "snnc_integer", None)
    if not isinstance(meta, dict) or meta.get("input_scale") is None or "input_bits" not in meta:
        return inputs
    from snnc.passes.quantize_integer import quantize_input
    return [quantize_input(gm, x) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]


def save(gm: fx.GraphModule, path, overwrite: bool = False):
    """Save a spiking-IR graph (nodes, modules, parameters, input spec) to ``path`` atomically, in
    the code-free graph format of ``snnc.graphfile`` (the graph is saved in its reset state)."""
    from .graphfile import GRAPH_FORMAT, GRAPH_VERSION, graph_files
    graph_spec(gm)
    reset(gm)
    files = graph_files(gm)
    return write_bundle(path, {"format": GRAPH_FORMAT, "version": GRAPH_VERSION}, files, overwrite=overwrite)


def load_graph(path, trust: bool = False) -> fx.GraphModule:
    """Load a graph written by ``snnc.save``. Reading it runs no code from the file (module
    classes and functions come from snnc's allowlist). A graph in the old pickle format (before
    version 2) can run code when read: it loads only with ``trust=True``, with a warning."""
    from .graphfile import GRAPH_FORMAT, graph_from_files
    path = require_file(path, "graph file")
    if is_bundle(path):
        _, files = read_bundle(path, "graph file", expect_format=GRAPH_FORMAT)
        gm = graph_from_files(files, str(path))
        install_call_check(gm)
        return gm
    if not trust:
        raise FileFormatError(f"{path} is not an snnc graph file of this version (an old pickled graph, or not "
                              "a graph); a pickle can run code when read: load it with "
                              "snnc.load_graph(path, trust=True) (CLI: --trust-model-file) only if you trust it, "
                              "then snnc.save it again")
    payload = load_trusted_pickle(path, "graph file")
    if isinstance(payload, fx.GraphModule) and hasattr(payload, "snnc_spec"):
        return payload
    if not isinstance(payload, dict) or payload.get("format") != GRAPH_FORMAT:
        raise FileFormatError(f"{path} is a torch file but not an snnc graph (expected a dict with "
                              f"format={GRAPH_FORMAT!r}; write one with snnc.save)")
    gm = payload["module"]
    gm.snnc_spec = payload["spec"]
    install_call_check(gm)
    return gm


def load_trusted_pickle(path, what: str):
    """``torch.load(weights_only=False)`` of a file the user said they trust, with a one-line warning."""
    import warnings
    warnings.warn(f"loading {path} as a pickle: it can run code; do this only for files you trust",
                  stacklevel=3)
    try:
        return torch.load(path, weights_only=False, map_location="cpu")
    except Exception as e:  # any unpickling failure: the file is damaged or not a torch file
        raise FileFormatError(f"{path} is not a readable {what} (truncated or corrupt?): "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
