"""snnc: a compiler for spiking neural networks.

    g = snnc.trace(model, example)          # torch.fx graph with snnc ops: the spiking IR
    print(snnc.dump(g))                     # one line per node
    g = snnc.passes.unroll_timesteps(g, T=8)
    m = snnc.compile(g, target="tvm:llvm")  # callable; m.export(path); snnc.load(path)
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> "module:attribute"; imported on first use so `import snnc` stays light
_EXPORTS = {
    "trace": "snnc.tracer:trace",
    "dump": "snnc.printer:dump",
    "verify": "snnc.verifier:verify",
    "annotate": "snnc.ir:annotate",
    "run": "snnc.runtime:run",
    "reset": "snnc.runtime:reset",
    "save": "snnc.runtime:save",
    "load_graph": "snnc.runtime:load_graph",
    "PassManager": "snnc.passmanager:PassManager",
    "compile": "snnc.compiled:compile",
    "load": "snnc.compiled:load",
    "convert": "snnc.conversion:convert",
    "retrain": "snnc.training:retrain",
    "from_nir": "snnc.nir:from_nir",
    "to_nir": "snnc.nir:to_nir",
    "SnncError": "snnc.errors:SnncError",
}
_SUBMODULES = ("ops", "passes", "targets", "zoo", "data", "ir", "errors")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES)


def __getattr__(name):
    if name in _EXPORTS:
        module, attr = _EXPORTS[name].split(":")
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"snnc.{name}")
    raise AttributeError(f"module 'snnc' has no attribute {name!r}")
