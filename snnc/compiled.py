"""``snnc.compile`` / ``snnc.load``: the target registry and the object every target returns.

A target is one module in ``targets/`` with ``compile(gm, target, **options) -> CompiledModule``
and ``load(path, meta) -> CompiledModule``. Registration is one line in ``TARGETS``.
``m.export(path)`` writes one file at ``path`` (any name): an snnc bundle (``fileio``) holding the
metadata (target, input spec, T, output meaning, the CPU it was built for) and the target's
artefact with its sha256. ``snnc.load(path)`` verifies the bytes before it parses or dlopens
anything, refuses a library built for an ISA this host lacks, and needs no Python model.
A compiled TVM library is native code: load exports only from sources you trust (as TVM and
torch say of their own libraries); the hash guards against damage, not against its author.
"""
from __future__ import annotations

import abc
import importlib
import json
import math
import os
import shutil
import warnings
import weakref
from pathlib import Path

import torch

from .errors import FileFormatError, InputError, SnncError, VerifyError, node_ref
from .fileio import OverwriteError, is_bundle, private_dir, read_bundle, require_file, write_bundle
from .ir import graph_spec
from .ops import is_snnc_op

TARGETS = {
    "torch": "snnc.targets.eager",
    "onnx": "snnc.targets.onnx",
    "tvm:llvm": "snnc.targets.tvm",
    "tvm:cuda": "snnc.targets.tvm",
    "tvm:int": "snnc.targets.tvm_int",
}
META_SUFFIX = ".snnc.json"  # the sidecar of exports before format version 2 (read with trust=True)
COMPILED_FORMAT = "snnc-compiled"
COMPILED_VERSION = 2
# the artefact's name inside the bundle, per target (the suffix tells TVM's loader what it is)
ARTEFACTS = {"torch": "graph.snnc", "onnx": "model.onnx", "tvm:llvm": "lib.so", "tvm:cuda": "lib.so",
             "tvm:int": "module.tar"}


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


def load(path, trust: bool = False) -> "CompiledModule":
    """Load a module written by ``CompiledModule.export``: every byte is checked against the
    sha256 in its metadata first (a damaged or swapped file is a ``FileFormatError``). Exports
    from before format version 2 (artefact + ``.snnc.json`` beside it, no hashes) load only with
    ``trust=True``."""
    path = Path(path)
    meta_path = path.with_name(path.name + META_SUFFIX)
    if not is_bundle(path) and meta_path.exists() and path.exists():
        return _load_legacy(path, meta_path, trust)
    meta, files = read_bundle(path, "compiled module", expect_format=COMPILED_FORMAT)
    target, name = meta.get("target"), meta.get("artefact")
    if target not in TARGETS or name != ARTEFACTS[target] or set(files) != {name}:
        raise FileFormatError(f"{path}: metadata names target {target!r} and artefact {name!r}, which do not "
                              f"match its contents {sorted(files)}")
    try:
        CompiledModule.spec_from_meta(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise FileFormatError(f"{path}: malformed input spec in the metadata ({type(e).__name__}: {e})") from None
    check_host(meta, path)
    folder = private_dir()
    try:
        artefact = Path(folder) / name
        artefact.write_bytes(files[name])
        module = _target_module(target).load(artefact, meta)
    except FileFormatError as e:  # name the user's file, not the private copy
        shutil.rmtree(folder, ignore_errors=True)
        raise FileFormatError(str(e).replace(str(artefact), f"{path} [{name}]")) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    weakref.finalize(module, shutil.rmtree, folder, True)  # a TVM library re-exports from this copy
    return module


def check_host(meta: dict, path) -> None:
    """Refuse a library built for CPU features this host lacks (it would die with SIGILL)."""
    isa, tdict = meta.get("host_isa"), meta.get("tvm_target") or {}
    if not isa or not tdict.get("mcpu"):
        return  # torch / onnx / tvm:int / a portable build (mcpu=None): runs on any x86-64
    from snnc.targets.tvm_build import host_isa
    here = host_isa()
    missing = sorted(set(isa.get("features", [])) - set(here["features"]))
    if missing:
        raise SnncError(f"{path} was built for CPU {tdict['mcpu']!r} with {', '.join(missing)}, which this CPU "
                        f"({here['cpu']}) lacks; recompile it here, or with mcpu=None for a portable library")


def _load_legacy(path, meta_path, trust):
    if not trust:
        raise FileFormatError(f"{path} is an export from before format version 2 (no integrity hashes); "
                              "re-export it, or load it with snnc.load(path, trust=True) if you trust it")
    warnings.warn(f"loading {path} without integrity checks (old export format)", stacklevel=3)
    require_file(meta_path, "snnc metadata file")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{meta_path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != COMPILED_FORMAT or meta.get("target") not in TARGETS:
        raise FileFormatError(f"{meta_path} is not snnc compiled-module metadata")
    require_file(path, f"{meta['target']} artefact")
    if meta["target"] == "torch":
        from .runtime import load_graph
        from .targets.eager import TorchModule
        return TorchModule(load_graph(path, trust=True), meta)
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
        """Write one file at ``path`` (any name): metadata and artefact in one bundle, replaced by
        one rename (never half an export); never replaces a file unless asked."""
        path = Path(path)
        if path.is_dir():
            raise OverwriteError(f"{path} is a directory; give the file to write")
        if path.exists() and not overwrite:
            raise OverwriteError(f"{path} exists; pass overwrite=True to replace it")
        name = ARTEFACTS[self.target]
        folder = private_dir()
        try:
            self._write(os.path.join(folder, name))
            data = Path(folder, name).read_bytes()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        meta = {k: v for k, v in self.meta.items() if k != "files"}
        meta.update({"format": COMPILED_FORMAT, "version": COMPILED_VERSION, "target": self.target,
                     "artefact": name, "inputs": [[list(s), d] for s, d in self.spec["inputs"]],
                     "layout": self.spec["layout"], "T": self.spec.get("T")})
        from . import __version__
        meta["snnc_version"] = __version__
        return write_bundle(path, meta, {name: data}, overwrite=overwrite)

    @staticmethod
    def spec_from_meta(meta: dict) -> dict:
        return {"inputs": [(tuple(s), d) for s, d in meta["inputs"]], "layout": meta["layout"], "T": meta.get("T")}
