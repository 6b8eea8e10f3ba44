"""The verifier: run after every pass. Checks that the graph is well formed, every op is known to
the IR, metadata matches what the graph computes, and time layouts fit each op."""
from __future__ import annotations

from torch import fx

from .errors import VerifyError, node_ref
from .ir import FUNCTION_OPS, METHOD_OPS, MODULE_OPS, annotate, info, module_of, op_spec


def supported_ops() -> list[str]:
    names = {s.name for s in list(MODULE_OPS.values()) + list(FUNCTION_OPS.values()) + list(METHOD_OPS.values())}
    from . import ops as _ops
    for obj in vars(_ops).values():
        if isinstance(obj, type) and hasattr(obj, "op_name"):
            names.add(obj.op_name)
    return sorted(names)


def check_known_ops(gm: fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if op_spec(gm, n) is None:
            what = type(module_of(gm, n)).__name__ if n.op == "call_module" else getattr(n.target, "__name__", n.target)
            raise VerifyError(f"{node_ref(n)}: op {what} is not part of the spiking IR; supported: "
                              + ", ".join(supported_ops()))


def verify(gm: fx.GraphModule) -> fx.GraphModule:
    """Raise ``VerifyError`` naming the first bad node; returns ``gm`` unchanged otherwise."""
    try:
        gm.graph.lint()
    except Exception as e:  # fx's lint raises RuntimeError with its own wording
        raise VerifyError(f"malformed graph: {e}") from None
    check_known_ops(gm)
    layouts = _static_layouts(gm)
    for n in gm.graph.nodes:
        _check_layout(gm, n, layouts)
    annotate(gm, expected={n: info(n) for n in gm.graph.nodes})
    return gm


def _static_layouts(gm):
    """Time layout of every tensor value, from the graph's structure alone (no execution)."""
    from .ir import _out_layout
    spec_layout = gm.snnc_spec["layout"] if hasattr(gm, "snnc_spec") else "step"
    out = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            out[n] = spec_layout
        elif n.op != "output":
            ins = [_Lay(out[a]) for a in n.all_input_nodes if a in out and a.op != "get_attr"]
            out[n] = _out_layout(gm, n, ins)
    return out


class _Lay:
    def __init__(self, layout):
        self.layout = layout


def _check_layout(gm, n, static):
    if n.op not in ("call_module", "call_function", "call_method"):
        return
    spec = op_spec(gm, n)
    tensor_ins = [a for a in n.all_input_nodes
                  if a.op != "get_attr" and not isinstance(a.meta.get("snnc"), (int, float, tuple, list))]
    layouts = {static[a] for a in tensor_ins}
    mod = module_of(gm, n)
    mode = getattr(mod, "step_mode", None)
    name = spec.name
    if getattr(mod, "own_time_layout", False):  # batch-first multi-step ops (sinabs) read T themselves
        return
    if name.startswith("snn.") and mode == "m" and name not in ("snn.direct_encoder", "snn.poisson_encoder"):
        if layouts - {"seq"}:
            raise VerifyError(f"{node_ref(n)}: multi-step {name} needs a [T, N, ...] input, got layout "
                              f"{sorted(layouts)}")
        return
    if name == "time.merge" and layouts != {"seq"}:
        raise VerifyError(f"{node_ref(n)}: time.merge needs a [T, N, ...] input, got {sorted(layouts)}")
    if name == "time.split" and layouts != {"flat"}:
        raise VerifyError(f"{node_ref(n)}: time.split needs a [T*N, ...] input, got {sorted(layouts)}")
    if not spec.time_agnostic and "seq" in layouts:
        raise VerifyError(f"{node_ref(n)}: {name} cannot take a [T, N, ...] input; merge time into the "
                          "batch first (time.merge)")
    if len(layouts) > 1 and len(tensor_ins) > 1:
        raise VerifyError(f"{node_ref(n)}: inputs mix time layouts {sorted(layouts)}")
