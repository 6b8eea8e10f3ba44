"""Reference semantics: running a spiking-IR graph in torch eager, resetting state, saving graphs."""
from __future__ import annotations

import io
import pickle
import zipfile

import torch
from torch import fx, nn

from .errors import FileFormatError, InputError
from .fileio import atomic_write, require_file
from .ir import graph_spec, install_call_check
from .ops import Readout, reset

GRAPH_FORMAT = "snnc-graph"


def _ends_in_readout(gm: fx.GraphModule) -> bool:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    src = out.args[0]
    return (isinstance(src, fx.Node) and src.op == "call_module"
            and isinstance(gm.get_submodule(src.target), Readout))


def run(gm: nn.Module, inputs, T: int | None = None):
    """Run the reference interpreter from a reset state.

    * multi-step graph (after ``unroll_timesteps``): one call, returns the graph's output.
    * per-step graph: ``T`` calls. An input with one more leading dim than the graph's input spec
      is read as ``[T, N, ...]`` and fed step by step; otherwise the same input is fed each step.
      Returns the last output if the graph ends in a readout, else the outputs stacked ``[T, ...]``.
    """
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    spec = graph_spec(gm) if hasattr(gm, "snnc_spec") else {"layout": "step", "inputs": None}
    reset(gm)
    with torch.no_grad():
        if spec.get("T") or T is None:
            out = gm(*inputs)
            reset(gm)
            return out
        ranks = [len(s) for s, _ in spec["inputs"]] if spec["inputs"] else [x.dim() for x in inputs]
        per_step = [x.dim() == r + 1 for x, r in zip(inputs, ranks)]
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


def save(gm: fx.GraphModule, path, overwrite: bool = False):
    """Save a spiking-IR graph (code, parameters and input spec) to ``path`` atomically."""
    payload = {"format": GRAPH_FORMAT, "version": 1, "module": gm, "spec": graph_spec(gm)}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp), overwrite=overwrite)


def load_graph(path) -> fx.GraphModule:
    """Load a graph written by ``snnc.save`` (a pickle: only load files you trust)."""
    path = require_file(path, "graph file")
    try:
        payload = torch.load(path, weights_only=False, map_location="cpu")
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError,
            AttributeError, ModuleNotFoundError, io.UnsupportedOperation, OSError) as e:
        raise FileFormatError(f"{path} is not a readable snnc graph file (truncated or corrupt?): "
                              f"{type(e).__name__}: {e}") from None
    if isinstance(payload, fx.GraphModule) and hasattr(payload, "snnc_spec"):
        return payload
    if not isinstance(payload, dict) or payload.get("format") != GRAPH_FORMAT:
        raise FileFormatError(f"{path} is a torch file but not an snnc graph (expected a dict with "
                              f"format={GRAPH_FORMAT!r}; write one with snnc.save)")
    gm = payload["module"]
    gm.snnc_spec = payload["spec"]
    install_call_check(gm)
    return gm
