"""The pass manager: run named passes in order, verify and time each, dump the IR after each.

A pass is a plain function ``pass(gm, **options) -> GraphModule`` that leaves its input unchanged
(unless its docstring says otherwise). The registry of passes by name is ``snnc.passes.PASSES``.
"""
from __future__ import annotations

import time
from pathlib import Path

from torch import fx

from .errors import SnncError
from .printer import dump
from .verifier import verify


def get_pass(name: str):
    from snnc.passes import PASSES
    if name not in PASSES:
        raise SnncError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(PASSES))}")
    return PASSES[name]


class PassManager:
    """``PassManager(["fold_bn", ("threshold_balance", {"calib": data}), my_fn], dump_dir="ir")``

    Each entry is a registered pass name, a ``(name, options)`` pair, or a callable. ``run(gm)``
    verifies after every pass (``verify=True``), records seconds per pass in ``self.timings`` and,
    with ``dump_dir``, writes ``00_input.ir``, ``01_<pass>.ir``, ... there.
    """

    def __init__(self, passes, verify: bool = True, dump_dir=None):
        self.passes = [self._resolve(p) for p in passes]
        self.verify = verify
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.timings: list[tuple[str, float]] = []

    @staticmethod
    def _resolve(entry):
        if isinstance(entry, str):
            return entry, get_pass(entry), {}
        if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str):
            return entry[0], get_pass(entry[0]), dict(entry[1])
        if callable(entry):
            return getattr(entry, "__name__", "pass"), entry, {}
        raise SnncError(f"PassManager entry {entry!r}: expected a pass name, (name, options) or a callable")

    def _dump(self, index, name, gm):
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            (self.dump_dir / f"{index:02d}_{name}.ir").write_text(dump(gm))

    def run(self, gm: fx.GraphModule) -> fx.GraphModule:
        self.timings = []
        self._dump(0, "input", gm)
        for i, (name, fn, options) in enumerate(self.passes, start=1):
            t0 = time.perf_counter()
            out = fn(gm, **options)
            if not isinstance(out, fx.GraphModule):
                raise SnncError(f"pass {name!r} returned {type(out).__name__}, expected a GraphModule")
            if self.verify:
                try:
                    verify(out)
                except SnncError as e:
                    raise type(e)(f"after pass {name!r}: {e}") from None
            self.timings.append((name, time.perf_counter() - t0))
            self._dump(i, name, out)
            gm = out
        return gm

    __call__ = run
