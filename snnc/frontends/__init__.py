"""Framework import: map third-party neuron modules onto ``snnc.ops`` before tracing.

A framework is one small file in this folder that calls ``register_neuron(cls, convert)`` for each
neuron class it maps (``convert(module) -> snnc op``). The file is imported on demand, the first
time ``snnc.trace`` meets a module whose class lives in that framework's package, so the
frameworks stay optional dependencies.
"""
from __future__ import annotations

import importlib
from typing import Callable

from torch import nn

CONVERTERS: dict[type, Callable[[nn.Module], nn.Module]] = {}

# top-level package of the framework -> snnc module that registers its converters
FRAMEWORKS = {"spikingjelly": "snnc.frontends.spikingjelly", "snntorch": "snnc.frontends.snntorch"}


def register_neuron(cls: type, convert: Callable[[nn.Module], nn.Module]) -> None:
    CONVERTERS[cls] = convert


def _load_framework_for(mod: nn.Module) -> None:
    pkg = type(mod).__module__.split(".")[0]
    if pkg in FRAMEWORKS:
        importlib.import_module(FRAMEWORKS[pkg])


def convert_foreign_modules(model: nn.Module) -> nn.Module:
    """Replace, in place, every registered third-party neuron in ``model`` by its snnc op."""
    for name, child in list(model.named_children()):
        _load_framework_for(child)
        conv = CONVERTERS.get(type(child))
        if conv is not None:
            setattr(model, name, conv(child))
        else:
            convert_foreign_modules(child)
    return model
