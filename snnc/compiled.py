"""``snnc.compile`` / ``snnc.load``: the target registry and the object every target returns.

A target is one module in ``targets/`` with ``compile(gm, target, **options) -> CompiledModule``
and ``load(path, meta) -> CompiledModule``. Registration is one line in ``TARGETS``.
``m.export(path)`` writes the target's artefact at ``path`` and a metadata file
``<path>.snnc.json`` (target, input spec, T, output meaning) beside it; ``snnc.load(path)`` reads
the metadata to pick the target, and needs no Python model.
"""
from __future__ import annotations

import abc
import importlib
import json
import math
from pathlib import Path

import torch

from .errors import FileFormatError, InputError, SnncError, VerifyError, node_ref
from .fileio import OverwriteError, atomic_write, require_file
from .ir import graph_spec
from .ops import is_snnc_op

TARGETS = {
    "torch": "snnc.targets.eager",
    "onnx": "snnc.targets.onnx",
    "tvm:llvm": "snnc.targets.tvm",
    "tvm:cuda": "snnc.targets.tvm",
    "tvm:int": "snnc.targets.tvm_int",
}
META_SUFFIX = ".snnc.json"


def _target_module(target: str):
    if target not in TARGETS:
        raise SnncError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
    return importlib.import_module(TARGETS[target])


def compile(gm, target: str = "torch", **options) -> "CompiledModule":
    """Compile a spiking-IR graph for ``target`` (see ``TARGETS``)."""
    graph_spec(gm)
    check_finite(gm)
    return _target_module(target).compile(gm, target=target, **options)


def check_finite(gm) -> None:
    """Refuse NaN / inf weights and op attributes (e.g. a broken checkpoint or a diverged
    training run) before any target bakes them in; the error names the node and tensor."""
    nodes = {n.target: n for n in gm.graph.nodes if n.op in ("call_module", "get_attr")}
    for name, t in [*gm.named_parameters(), *gm.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            owner = name.rpartition(".")[0]
            where = node_ref(nodes[owner]) if owner in nodes else f"attribute {owner or name!r}"
            raise VerifyError(f"{where}: tensor {name!r} has {int((~torch.isfinite(t)).sum())} NaN/inf "
                              f"value(s) of {t.numel()}; fix the weights before compiling")
    for n in gm.graph.nodes:
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        attrs = mod.attrs() if mod is not None and is_snnc_op(mod) else {}
        for k, v in attrs.items():
            if isinstance(v, float) and not math.isfinite(v):
                raise VerifyError(f"{node_ref(n)}: attribute {k}={v} is not finite")


def load(path) -> "CompiledModule":
    """Load a module written by ``CompiledModule.export``."""
    path = Path(path)
    meta_path = path.with_name(path.name + META_SUFFIX)
    require_file(meta_path, "snnc metadata file")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != "snnc-compiled" or "target" not in meta:
        raise FileFormatError(f"{meta_path} is not snnc compiled-module metadata")
    require_file(path, f"{meta['target']} artefact")
    return _target_module(meta["target"]).load(path, meta)


def output_meaning(gm) -> str:
    """What the graph returns, for the metadata: readout logits or a spike/tensor sequence."""
    from .runtime import _ends_in_readout
    return "readout [N, ...] (time-averaged)" if _ends_in_readout(gm) else "graph output"


class CompiledModule(abc.ABC):
    """A callable compiled graph. Subclasses implement ``forward(*inputs)`` and ``_write(path)``.

    ``dynamic_batch``: whether the batch dimension may differ from the spec's."""

    dynamic_batch = True

    def __init__(self, target: str, spec: dict, meta: dict | None = None):
        self.target = target
        self.spec = spec
        self.meta = dict(meta or {})

    def check_inputs(self, inputs):
        expected = self.spec["inputs"]
        if len(inputs) != len(expected):
            raise InputError(f"{self.target} module takes {len(expected)} input(s), got {len(inputs)}")
        bdim = 1 if self.spec["layout"] == "seq" else 0
        for i, (x, (shape, dtype)) in enumerate(zip(inputs, expected)):
            if not isinstance(x, torch.Tensor):
                raise InputError(f"input {i}: expected a torch.Tensor, got {type(x).__name__}")
            got, want = list(x.shape), list(shape)
            same = len(got) == len(want) and all(
                g == w or (d == bdim and self.dynamic_batch) for d, (g, w) in enumerate(zip(got, want)))
            if not same:
                batch = " (any batch size)" if self.dynamic_batch else ""
                raise InputError(f"input {i}: expected shape {want}{batch}, got {got}{self._layout_hint()}")
            if str(x.dtype).replace("torch.", "") != dtype:
                raise InputError(f"input {i}: expected dtype {dtype}, got {str(x.dtype).replace('torch.', '')}")

    def _layout_hint(self) -> str:
        T, layout = self.spec.get("T"), self.spec["layout"]
        if layout == "seq":
            return f"; the module takes the whole [T, N, ...] sequence with T={T} (it was compiled for {T} steps)"
        if T:
            return f"; the module takes one static [N, ...] input and encodes its T={T} time steps itself"
        return ("; the module runs one time step [N, ...] per call: compile the multi-step graph "
                "(unroll_timesteps(g, T)) to give it a [T, N, ...] sequence")

    def __call__(self, *inputs):
        self.check_inputs(inputs)
        return self.forward(*inputs)

    @abc.abstractmethod
    def forward(self, *inputs):
        """Run the compiled graph on already-checked inputs."""

    @abc.abstractmethod
    def _write(self, path: str) -> None:
        """Write the target's artefact to ``path`` (a temp file that export renames)."""

    def export(self, path, overwrite: bool = False) -> Path:
        """Write the artefact and its metadata atomically; never replaces files unless asked."""
        path = Path(path)
        meta_path = path.with_name(path.name + META_SUFFIX)
        for p in (path, meta_path):
            if p.exists() and not overwrite:
                raise OverwriteError(f"{p} exists; pass overwrite=True to replace it")
        had_artefact = path.exists()
        atomic_write(path, self._write, overwrite=overwrite)
        meta = {"format": "snnc-compiled", "version": 1, "target": self.target,
                "inputs": [[list(s), d] for s, d in self.spec["inputs"]], "layout": self.spec["layout"],
                "T": self.spec.get("T"), **self.meta}
        try:
            atomic_write(meta_path, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1)), overwrite=overwrite)
        except BaseException:
            if not had_artefact:  # no half export: an artefact without metadata cannot be loaded
                path.unlink(missing_ok=True)
            raise
        return path

    @staticmethod
    def spec_from_meta(meta: dict) -> dict:
        return {"inputs": [(tuple(s), d) for s, d in meta["inputs"]], "layout": meta["layout"], "T": meta.get("T")}
