"""The verifier: run after every pass. Checks that the graph is well formed, every op is known to
the IR (its op record), each op gets the time layouts its record accepts, and the metadata matches
what the graph computes."""
from __future__ import annotations

from torch import fx

from .errors import VerifyError, node_ref
from .ir import _out_layout, annotate, info, metadata_is_current, module_of, op_spec
from .ops import registry


def supported_ops() -> list[str]:
    """Every op the spiking IR knows (from the op registry)."""
    return registry.supported()


def check_known_ops(gm: fx.GraphModule) -> None:
    for n in gm.graph.nodes:
        if op_spec(gm, n) is None:
            what = type(module_of(gm, n)).__name__ if n.op == "call_module" else getattr(n.target, "__name__", n.target)
            raise VerifyError(f"{node_ref(n)}: op {what} is not part of the spiking IR; supported: "
                              + ", ".join(supported_ops()))


def verify(gm: fx.GraphModule) -> fx.GraphModule:
    """Raise ``VerifyError`` naming the first bad node; returns ``gm`` unchanged otherwise.

    The metadata check runs nothing when the graph is unchanged since its metadata was computed
    (a pass that annotated its result is not run a second time); otherwise it checks the shapes
    from the op records and fake tensors, and runs the graph only when those cannot decide."""
    try:
        gm.graph.lint()
    except Exception as e:  # fx's lint raises RuntimeError with its own wording
        raise VerifyError(f"malformed graph: {e}") from None
    check_known_ops(gm)
    layouts = _static_layouts(gm)
    for n in gm.graph.nodes:
        _check_layout(gm, n, layouts)
    if not metadata_is_current(gm) and not _metadata_matches_static_shapes(gm):
        annotate(gm, expected={n: info(n) for n in gm.graph.nodes})
    return gm


def _metadata_matches_static_shapes(gm) -> bool:
    """Check stale-looking metadata without running the model (op records' shape rules and fake
    tensors); False when that cannot decide (a node without metadata, a data-dependent op)."""
    from .static_shapes import static_shapes
    if not all("snnc" in n.meta for n in gm.graph.nodes):
        return False
    shapes = static_shapes(gm)
    if shapes is None:
        return False
    for n in gm.graph.nodes:
        old = info(n)
        if old is None:
            continue
        if n not in shapes:
            return False
        if (old.shape, old.dtype) != shapes[n]:
            shape, dtype = shapes[n]
            raise VerifyError(f"{node_ref(n)}: metadata says {old.dtype}{list(old.shape)} but the graph "
                              f"computes {dtype}{list(shape)}; the last pass left stale metadata")
    return True


def _static_layouts(gm):
    """Time layout of every tensor value, from the graph's structure and the op records alone."""
    spec_layout = gm.snnc_spec["layout"] if hasattr(gm, "snnc_spec") else "step"
    out = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            out[n] = spec_layout
        elif n.op != "output":
            ins = [_Lay(out[a], a) for a in n.all_input_nodes if a in out and a.op != "get_attr"]
            out[n] = _out_layout(gm, n, ins, info(n), gm.snnc_spec.get("T") if hasattr(gm, "snnc_spec") else None)
    return out


class _Lay:
    def __init__(self, layout, node):
        self.layout = layout
        self.shape = getattr(info(node), "shape", ())


_LAYOUT_WORDS = {"seq": "[T, N, ...]", "flat": "[T*N, ...]", "step": "[N, ...]"}


def _check_layout(gm, n, static):
    if n.op not in ("call_module", "call_function", "call_method"):
        return
    rec = op_spec(gm, n)
    tensor_ins = [a for a in n.all_input_nodes
                  if a.op != "get_attr" and not isinstance(a.meta.get("snnc"), (int, float, tuple, list))]
    layouts = {static[a] for a in tensor_ins}
    mod = module_of(gm, n)
    name = rec.name
    needs = rec.accepts(mod) if rec.accepts is not None else None
    if needs is not None:
        if layouts - needs:
            want = " or ".join(_LAYOUT_WORDS[x] for x in sorted(needs))
            mode = "multi-step " if getattr(mod, "step_mode", None) == "m" else ""
            raise VerifyError(f"{node_ref(n)}: {mode}{name} needs a {want} input, got layout {sorted(layouts)}")
        return
    if not rec.time_agnostic and "seq" in layouts:
        raise VerifyError(f"{node_ref(n)}: {name} cannot take a [T, N, ...] input; merge time into the "
                          "batch first (time.merge)")
    if len(layouts) > 1 and len(tensor_ins) > 1:
        raise VerifyError(f"{node_ref(n)}: inputs mix time layouts {sorted(layouts)}")
