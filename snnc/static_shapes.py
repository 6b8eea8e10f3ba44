"""Shapes and dtypes of every node without running the model: the op records' shape rules, and
for ops without one the op itself on fake tensors (``FakeTensorMode``: shapes propagate, no
arithmetic runs). The verifier uses it to check metadata that a pass left behind instead of
executing the graph a second time.
"""
from __future__ import annotations

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensorMode

from .ir import graph_spec, module_of
from .ops import registry, reset


class _FakeRun(fx.Interpreter):
    def run_node(self, n):
        rec = registry.lookup(self.module, n)
        if rec is not None and rec.shape is not None and n.op == "call_module":
            ins = [self.env[a] for a in n.all_input_nodes if isinstance(self.env.get(a), torch.Tensor)]
            shape, dtype = rec.shape(module_of(self.module, n), [(tuple(t.shape), t.dtype) for t in ins])
            return torch.empty(shape, dtype=dtype)
        return super().run_node(n)


def static_shapes(gm: fx.GraphModule) -> dict | None:
    """``{node: (shape, dtype)}`` for every tensor-valued node, or ``None`` when an op cannot be
    evaluated on fake tensors (data-dependent control flow): then only a real run can tell."""
    spec = graph_spec(gm)
    out = {}
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            inputs = [torch.empty(shape, dtype=getattr(torch, dtype)) for shape, dtype in spec["inputs"]]
            run = _FakeRun(gm, garbage_collect_values=False)
            with torch.no_grad():
                run.run(*inputs)
            for n, v in run.env.items():
                if isinstance(v, torch.Tensor):
                    out[n] = (tuple(v.shape), v.dtype)
    except Exception:  # data-dependent ops, RNGs ...: the caller falls back to a real run
        return None
    finally:
        reset(gm)   # stateful ops saw fake tensors
    return out

