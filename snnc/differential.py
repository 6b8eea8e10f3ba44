"""Differential testing: every available target against the reference interpreter, layer by layer.

    report = differential(gm, x)            # gm: multi-step graph (or per-step graph + T=)
    print(report)                           # per target, per layer: agreement and max |diff|
    assert report.ok, report.failures()

How layers are compared, the same way for every target: the graph is rewritten into a *probe
graph* whose output is the tuple of (for each neuron, in graph order) its input current and its
spikes, followed by the graph's own outputs. The reference interpreter (``snnc.run``) and each
target run that one graph, so a target needs nothing beyond compiling a graph with several
outputs. A target that cannot compile a multi-output graph is given one prefix graph per probe
instead (the graph cut after that value).

Pass criteria (DESIGN.md): float targets reach >= 99.9 % agreement on every probe (spikes equal;
currents and outputs within ``atol + rtol * |ref|``), so rare threshold ties that flip a spike
are tolerated; on an integer graph (``gm.snnc_integer`` or integer inputs) every target must be
bit-exact (100 %). The report names, per target, the first layer whose agreement falls below
its bound. Targets whose module is absent, that need hardware this machine lacks, that apply
only to integer graphs, or that refuse an op (``UnsupportedOp``) are listed as skipped, with why.
"""
from __future__ import annotations

import copy
import dataclasses
import importlib

import torch
from torch import fx

from .compiled import TARGETS, compile as compile_graph
from .errors import SnncError, UnsupportedOp
from .ir import annotate, graph_spec, info, op_name, op_spec
from .ops import Neuron, Readout
from .runtime import run

FLOAT_AGREEMENT = 0.999
INTEGER_ONLY_TARGETS = ("tvm:int",)   # targets that compile only the integer IR


@dataclasses.dataclass
class LayerResult:
    layer: str            # "%lif_1", "%split_time_3 (into %lif_1)", "%readout (output)"
    op: str
    spiking: bool
    agreement: float      # fraction of elements equal (spikes, exact) or close (values)
    max_diff: float
    ok: bool


@dataclasses.dataclass
class TargetResult:
    target: str
    status: str           # "ok" | "diverged" | "error" | "skipped"
    reason: str = ""
    required: float = FLOAT_AGREEMENT
    layers: list = dataclasses.field(default_factory=list)

    @property
    def first_divergence(self) -> LayerResult | None:
        return next((r for r in self.layers if not r.ok), None)

    def __str__(self):
        head = f"target {self.target}: {self.status}"
        if self.status in ("skipped", "error"):
            return f"{head} ({self.reason})"
        first = self.first_divergence
        head += f" (required agreement {100 * self.required:g}%" + (
            f"; first divergence at {first.layer} {first.op})" if first else ")")
        rows = [f"  {'layer':34} {'op':18} {'kind':6} {'agree':>9} {'max|diff|':>10}"]
        rows += [f"  {r.layer:34} {r.op:18} {'spike' if r.spiking else 'value':6} "
                 f"{100 * r.agreement:8.3f}% {r.max_diff:10.3g}" + ("" if r.ok else "  <-- diverges")
                 for r in self.layers]
        return "\n".join([head] + rows)


@dataclasses.dataclass
class Report:
    integer: bool
    targets: dict

    @property
    def ok(self) -> bool:
        return all(t.status in ("ok", "skipped") for t in self.targets.values())

    def ran(self) -> list[str]:
        return [n for n, t in self.targets.items() if t.status != "skipped"]

    def failures(self) -> str:
        return "\n".join(str(t) for t in self.targets.values() if t.status in ("diverged", "error"))

    def __str__(self):
        return "\n".join(str(t) for t in self.targets.values())


def is_integer_graph(gm) -> bool:
    return hasattr(gm, "snnc_integer") or any(
        not getattr(torch, d).is_floating_point for _, d in graph_spec(gm)["inputs"])


def _copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    out = copy.deepcopy(gm)
    for k, v in vars(gm).items():  # deepcopy drops plain attributes such as snnc_spec
        if k.startswith("snnc_"):
            setattr(out, k, copy.deepcopy(v))
    return out


def _probes(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(node name, label) of each neuron's input current and spikes, then the graph outputs."""
    out, seen = [], set()

    def add(node, label):
        if node.name not in seen and node.op != "placeholder" and info(node) is not None:
            seen.add(node.name)
            out.append((node.name, label))

    for n in gm.graph.nodes:
        spec = op_spec(gm, n)
        if n.op == "call_module" and spec is not None and spec.spiking == "yes" and n.all_input_nodes:
            add(n.all_input_nodes[0], f"%{n.all_input_nodes[0].name} (into %{n.name})")
            add(n, f"%{n.name}")
        if n.op == "output":
            leaves = []
            fx.node.map_arg(n.args[0], leaves.append)
            for a in leaves:
                add(a, f"%{a.name} (output)")
    return out


def _cut(gm: fx.GraphModule, names: list[str]) -> fx.GraphModule:
    """A copy of ``gm`` whose output is the tuple of nodes ``names`` (one name: that node)."""
    out = _copy_graph(gm)
    nodes = {n.name: n for n in out.graph.nodes}
    old = next(n for n in out.graph.nodes if n.op == "output")
    with out.graph.inserting_after(old):
        value = tuple(nodes[k] for k in names) if len(names) > 1 else nodes[names[0]]
        out.graph.output(value)
    out.graph.erase_node(old)
    out.graph.eliminate_dead_code()
    out.recompile()
    out.delete_all_unused_submodules()
    return annotate(out)


def _as_list(y):
    return list(y) if isinstance(y, (tuple, list)) else [y]


def _compare(ref, got, spiking, exact, rtol, atol) -> tuple[float, float]:
    if not isinstance(got, torch.Tensor) or tuple(got.shape) != tuple(ref.shape):
        return 0.0, float("inf")
    r, g = ref.detach().cpu().double(), got.detach().cpu().double()
    diff = (r - g).abs()
    max_diff = float(diff.max()) if diff.numel() else 0.0
    if exact or spiking:
        same = r == g
    else:
        scale = max(1.0, float(r.abs().max())) if r.numel() else 1.0
        same = diff <= atol * scale + rtol * r.abs()
    return (float(same.double().mean()) if same.numel() else 1.0), max_diff


def unavailable_reason(name: str) -> str | None:
    """Why target ``name`` cannot run on this machine (module absent, no GPU...), or None.
    A target module may define its own ``unavailable_reason(target)``."""
    try:
        mod = importlib.import_module(TARGETS[name])
    except ImportError as e:
        return f"target module {TARGETS[name]} cannot be imported here: {e}"
    check = getattr(mod, "unavailable_reason", None)
    return check(name) if callable(check) else (_no_cuda() if "cuda" in name else None)


def _no_cuda() -> str | None:
    if torch.cuda.is_available():
        return None
    try:
        import tvm
        if tvm.cuda(0).exist:
            return None
    except Exception:
        pass
    return "no CUDA device on this machine"


def _run_target(name, probe_gm, gm, probes, inputs, options):
    """Outputs of every probe on target ``name``: one multi-output compile, else one per probe."""
    try:
        outs = _as_list(compile_graph(probe_gm, target=name, **options)(*inputs))
        if len(outs) == len(probes):
            return outs
    except Exception:  # e.g. a backend that builds single-output graphs only: fall back below;
        pass           # an op it cannot lower raises UnsupportedOp again there
    return [compile_graph(_cut(gm, [k]), target=name, **options)(*inputs) for k, _ in probes]


def differential(gm: fx.GraphModule, inputs, targets=None, T: int | None = None,
                 rtol: float = 1e-4, atol: float = 1e-5, options: dict | None = None) -> Report:
    """Run the reference and each target (default: all of ``snnc.compiled.TARGETS``) on
    ``inputs``; compare per layer. ``T`` unrolls a per-step graph first; ``options`` maps a
    target name to its compile options (``{"onnx": {"loop": "scan"}}``)."""
    if not graph_spec(gm).get("T") and any(isinstance(m, (Neuron, Readout)) for m in gm.modules()):
        if T is None:
            raise SnncError("differential: the graph is per-step; pass T= (or unroll it first)")
        from snnc.passes import unroll_timesteps
        gm = unroll_timesteps(gm, T=T)
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    integer = is_integer_graph(gm)
    probes = _probes(gm)
    if not probes:
        raise SnncError("differential: the graph has no neuron and no tensor output to compare")
    probe_gm = _cut(gm, [k for k, _ in probes])
    refs = _as_list(run(probe_gm, inputs))
    nodes = {n.name: n for n in probe_gm.graph.nodes}
    report = Report(integer, {})
    for name in (targets or list(TARGETS)):
        if name not in TARGETS:
            raise SnncError(f"differential: unknown target {name!r}; available: {', '.join(TARGETS)}")
        required = 1.0 if integer else FLOAT_AGREEMENT
        res = report.targets[name] = TargetResult(name, "skipped", required=required)
        if name in INTEGER_ONLY_TARGETS and not integer:
            res.reason = "integer-only target; this is a float graph"
            continue
        why = unavailable_reason(name)
        if why:
            res.reason = why
            continue
        try:
            outs = _run_target(name, probe_gm, gm, probes, inputs, (options or {}).get(name, {}))
        except UnsupportedOp as e:
            res.reason = f"UnsupportedOp: {e}"
            continue
        except Exception as e:
            res.status, res.reason = "error", f"{type(e).__name__}: {e}"
            continue
        for (key, label), ref, got in zip(probes, refs, outs):
            spiking = bool(info(nodes[key]).spiking)
            agree, diff = _compare(ref, got, spiking, integer, rtol, atol)
            res.layers.append(LayerResult(label, op_name(probe_gm, nodes[key]), spiking, agree, diff,
                                          agree >= required))
        res.status = "ok" if res.first_divergence is None else "diverged"
    return report
