"""Framework import: map third-party neuron and layer modules onto ``snnc.ops`` before tracing.

A framework is one small file in this folder that calls ``register_neuron(cls, convert)`` for each
class it maps (``convert(module, ctx) -> nn.Module``; despite the name, stateless layer wrappers
such as spikingjelly's ``layer.Conv2d`` register the same way) and defines
``unsupported(module) -> str | None``, the reason a module of that framework that has no converter
cannot be imported (``None``: let the tracer look inside it). The file is imported on demand, the
first time ``snnc.trace`` meets a module whose class lives in that framework's package, so the
frameworks stay optional dependencies.

``ctx`` (a ``ConvertContext``) tells converters what the example input says, e.g. ``T`` for a
multi-step model fed ``[T, N, ...]``, so that a stateless layer on ``[T, N, ...]`` can become
``time.merge -> layer -> time.split(T)``.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable

from torch import nn

from ..errors import UnsupportedOp

CONVERTERS: dict[type, Callable] = {}

# top-level package of the framework -> snnc module that registers its converters
FRAMEWORKS = {"spikingjelly": "snnc.frontends.spikingjelly", "snntorch": "snnc.frontends.snntorch",
              "norse": "snnc.frontends.norse", "sinabs": "snnc.frontends.sinabs"}


@dataclasses.dataclass
class ConvertContext:
    T: int | None = None      # leading dim of the example input (used only by multi-step layers)
    path: str = ""            # dotted name of the module being converted, for messages


def register_neuron(cls: type, convert: Callable) -> None:
    CONVERTERS[cls] = convert


def _framework_of(mod: nn.Module):
    pkg = type(mod).__module__.split(".")[0]
    return importlib.import_module(FRAMEWORKS[pkg]) if pkg in FRAMEWORKS else None


def convert_module(mod: nn.Module, ctx: ConvertContext) -> nn.Module:
    """The snnc replacement of one module (``mod`` itself, children converted, if it needs none)."""
    framework = _framework_of(mod)
    conv = CONVERTERS.get(type(mod))
    if conv is not None:
        return conv(mod, ctx)
    if framework is not None:
        reason = framework.unsupported(mod)
        if reason:
            raise UnsupportedOp(f"module '{ctx.path}' ({type(mod).__module__}.{type(mod).__name__}): {reason}")
    return convert_children(mod, ctx)


def convert_children(model: nn.Module, ctx: ConvertContext) -> nn.Module:
    """Replace, in place, the children of ``model`` that need converting; returns ``model``."""
    for name, child in list(model.named_children()):
        sub = dataclasses.replace(ctx, path=f"{ctx.path}.{name}" if ctx.path else name)
        new = convert_module(child, sub)
        if new is not child:
            setattr(model, name, new)
    if type(model) is nn.Sequential:
        _fuse_time_groups(model)
    return model


def _time_group(m) -> bool:
    from ..ops import MergeTime, SplitTime
    return type(m) is nn.Sequential and len(m) >= 2 and isinstance(m[0], MergeTime) and isinstance(m[-1], SplitTime)


def _fuse_time_groups(seq: nn.Sequential) -> None:
    """Adjacent ``merge -> a -> split``, ``merge -> b -> split`` children become one
    ``merge -> a -> b -> split`` (the split/merge pair between them is an identity reshape)."""
    names, absorbed = list(seq._modules), []
    for first, second in zip(names, names[1:]):
        a, b = seq._modules[first], seq._modules[second]
        if _time_group(a) and _time_group(b) and a[-1].T == b[-1].T:
            seq._modules[second] = nn.Sequential(*list(a)[:-1], *list(b)[1:])
            absorbed.append(first)
    for name in absorbed:
        del seq._modules[name]


def convert_foreign_modules(model: nn.Module, example_inputs=None) -> nn.Module:
    """``model`` with every registered third-party module replaced by its snnc form (children are
    replaced in place; a foreign top-level module is returned converted). ``example_inputs`` gives
    ``T`` for multi-step layers: the leading dim of the first input."""
    first = example_inputs[0] if isinstance(example_inputs, (list, tuple)) and example_inputs else example_inputs
    ctx = ConvertContext(T=int(first.shape[0]) if getattr(first, "dim", lambda: 0)() >= 1 else None)
    return convert_module(model, ctx)
