"""Lowering of the integer IR (``snnc/ops/integer.py``) to TVM TIR: one PrimFunc per layer and a
host plan that calls them in graph order.

Neuron layers use the fused scan kernel that the float TVM targets use
(``tvm_kernels.neuron_scan_kernel``, one pass over T per layer) with dtype int32 and an integer
charge rule (leak by shift or fixed-point multiply, saturation), so both targets share one
neuron kernel. Its spikes come out in the membrane dtype (int32 0/1); the host casts the graph
output back to the reference's int8 when it is spikes. The layers the float targets hand to
torch or to TVM's Relax frontend (conv, linear, pooling, add, the summing readout) have integer
kernels here, written as TVMScript text from a converter table (op -> emitter). Every kernel is
batch-agnostic (one symbolic extent per kernel) and integer-only: int8 spikes/weights/input, int32 currents
and membranes, int64 for the membrane update (so ``state_bits=32`` cannot wrap before the
saturation), and the exact operations of the reference ops: ``>>`` is TIR's ``shift_right`` (an
arithmetic shift on signed ints, ``ashr`` in LLVM and ``>>`` in C), saturation is ``max(min())``.
The accumulators are int32 without checks: ``quantize_integer`` proved their worst-case range.

The plan is JSON-serialisable (it goes into the exported artefact): ``steps`` of
``kernel`` (call a PrimFunc), ``view`` (reshape a contiguous value) and ``broadcast`` (the
hoisted ``DirectEncoder``: repeat a static value over T), with shapes as ``[c, k]`` pairs meaning
``c * batch**k``.
"""
from __future__ import annotations

import math

import torch
from torch import fx

from snnc.errors import SnncError, UnsupportedOp, node_ref
from snnc.ir import example_inputs, graph_spec, info, op_name
from snnc.ops import IntAdd, IntConv2d, IntIF, IntLIF, IntLinear, IntReadout, IntSumPool2d, registry

from .tvm_int_vnni import byte_offset
from .tvm_int_vnni import emit_conv2d as emit_conv2d_vnni
from .tvm_int_vnni import emit_linear as emit_linear_vnni
from .tvm_kernels import NeuronScan, neuron_scan_kernel, pick_lanes

_TIR_DTYPE = {torch.int8: "int8", torch.int16: "int16", torch.int32: "int32", torch.int64: "int64"}


def supported_ops() -> list[str]:
    """The ops whose record has a ``tvm:int`` hook (an emitter below)."""
    return registry.supported("tvm:int")


# --- shapes that scale with the batch --------------------------------------------------------

def symbolic_shapes(gm: fx.GraphModule) -> dict:
    """node -> ``[[c, k], ...]``: each dim is ``c * batch**k`` (found by running the reference
    at batch 1 and 2; a dim that neither stays nor doubles is an error)."""
    shapes = []
    for batch in (1, 2):
        seen = {}

        class _Rec(fx.Interpreter):
            def run_node(self, n):
                v = super().run_node(n)
                if isinstance(v, torch.Tensor):
                    seen[n] = tuple(v.shape)
                return v
        from snnc.runtime import reset
        reset(gm)
        with torch.no_grad():
            _Rec(gm).run(*example_inputs(gm, batch=batch))
        reset(gm)
        shapes.append(seen)
    out = {}
    for n, s1 in shapes[0].items():
        s2, dims = shapes[1][n], []
        for a, b in zip(s1, s2):
            if a == b:
                dims.append([a, 0])
            elif b == 2 * a:
                dims.append([a, 1])
            else:
                raise SnncError(f"tvm:int: {node_ref(n)} has a dim that is not proportional to the batch ({a} -> {b})")
        out[n] = dims
    return out


def shape_at(sym, batch: int) -> tuple:
    return tuple(c * batch ** k for c, k in sym)


def _numel_sym(sym):
    """A shape's element count as ``[c, k]``."""
    c, k = 1, 0
    for dc, dk in sym:
        c, k = c * dc, k + dk
    if k > 1:
        raise SnncError("tvm:int: a value with two batch-sized dims")
    return [c, k]


# --- TVMScript emission ------------------------------------------------------------------------

def _header(name, args):
    """``args``: (arg name, shape tuple with 'm' for the symbolic extent, dtype)."""
    sig = ", ".join(f"{a}_h: T.handle" for a, _, _ in args)
    lines = ["@T.prim_func", f"def {name}({sig}):",
             f'    T.func_attr({{"global_symbol": "{name}", "tirx.noalias": True}})',
             "    m = T.int32()"]
    for a, shape, dt in args:
        lines.append(f'    {a} = T.match_buffer({a}_h, ({", ".join(map(str, shape))},), "{dt}")')
    return lines


def _i64(v):
    return f"T.int64({int(v)})"


def _parse(lines, extra=None):
    import tvm
    from tvm.script import tirx as T
    return tvm.script.parse("\n".join(lines), extra_vars={"T": T, **(extra or {})})


def _threshold_layout(v_th, sample):
    """``(NeuronScan threshold fields, buffer or None)``: a scalar, per channel (``[C, 1, 1]``:
    C values read at ``(i // inner) % C``), or any other pattern expanded to one sample. Integer
    version of ``tvm_lower.threshold_layout`` (that one goes through float32, which would round
    thresholds above 2**24)."""
    if isinstance(v_th, int):
        return {"v_th": v_th}, None
    full = torch.broadcast_to(v_th, tuple(sample)).to(torch.int32)
    rows = full.reshape(full.shape[0], -1)
    if bool((rows == rows[:, :1]).all()):
        values, inner = rows[:, 0].contiguous(), rows.shape[1]
    else:
        values, inner = full.reshape(-1).contiguous(), 1
    return {"v_th": "buffer", "threshold_size": values.numel(), "threshold_inner": inner}, values


def _charge_dtype(mod, x_bound) -> str:
    """int32 when no intermediate of the update can leave int32, else int64.

    The leaked membrane lies between ``v_leak`` and V (both within the state range), so its
    magnitude is at most ``m = max(2**(B-1), |v_leak|)``; H before saturation is at most
    ``m + |x|``, ``D = V - v_leak`` at most ``2m``, and the fixed-point product at most ``2m * decay_q + 2**(frac_bits-1)``. With int32
    the update runs on 16 lanes per AVX-512 register instead of 8 (2x on the biggest layers)."""
    if x_bound is None:
        return "int64"
    vl = abs(getattr(mod, "v_leak", 0))
    m = max(-mod.state_range[0], mod.state_range[1] + 1, vl)
    worst = max(m + 1 + x_bound, 2 * m + 1)  # H, and D = V - v_leak
    if isinstance(mod, IntLIF) and mod.leak_mode != "shift":
        worst = max(worst, 2 * m * mod.decay_q + (1 << (mod.frac_bits - 1)))
    return "int32" if worst < 2 ** 31 else "int64"


def _charge_rule(mod, x_bound=None):
    """``charge(v, x)`` on int32 TIR values, op for op as ``IntIF.forward`` / ``IntLIF.leak``:
    the update in int64 (int32 where ``_charge_dtype`` proves it cannot wrap), then saturation
    to ``state_bits`` and back to int32."""
    from tvm.script import tirx as T
    dt = _charge_dtype(mod, x_bound)
    c = (lambda v: T.Cast(dt, v)) if dt == "int64" else (lambda v: v)
    const = (lambda v: T.int64(v)) if dt == "int64" else (lambda v: T.int32(v))
    lo, hi = (const(b) for b in mod.state_range)

    def leak(v):
        if not isinstance(mod, IntLIF):
            return v
        vl = const(mod.v_leak)
        d = v - vl
        if mod.leak_mode == "shift":
            return vl + d - (d >> const(mod.shift))
        return vl + ((d * const(mod.decay_q) + const(1 << (mod.frac_bits - 1))) >> const(mod.frac_bits))

    return lambda v, x: T.Cast("int32", T.max(T.min(leak(c(v)) + c(x), hi), lo))


def _acc_range(weight, bias, in_range):
    """``(-b, b)``: the largest |output| of a conv / linear on inputs within ``in_range``."""
    if in_range is None:
        return None
    amax = max(abs(in_range[0]), abs(in_range[1]))
    w = weight.long().abs().reshape(weight.shape[0], -1).sum(1) * amax
    if bias is not None:
        w = w + bias.long().abs()
    bound = int(w.max()) if w.numel() else 0
    return (-bound, bound)


class KernelBuilder:
    """Collects PrimFuncs, parameters and plan steps while walking the graph."""

    def __init__(self, gm, codegen, isa=None):
        self.gm, self.codegen, self.isa = gm, codegen, isa
        self.sym = symbolic_shapes(gm)
        self.funcs: dict = {}
        self.params: dict[str, torch.Tensor] = {}
        self.steps: list[dict] = []
        self.dtype: dict = {}  # node -> TIR dtype of its value at run time
        self.range: dict = {}  # node -> (lo, hi) where known (spikes, pooled spikes, the int8 input)
        self.fused: set = set()  # nodes an earlier kernel already computed (conv + neuron fusion)
        self.T = graph_spec(gm)["T"]

    def value(self, node):
        return f"v_{node.name}"

    def kernel(self, node, name, func, args, params, out_sym, dtype=None):
        """Record a kernel: ``args`` = [(value name, kernel-view shape as sym)], ``params`` =
        param keys in signature order, ``out_sym`` = the kernel's output view shape."""
        self.funcs[name] = func
        self.dtype[node] = dtype or _TIR_DTYPE[info(node).dtype]
        self.steps.append({"op": "kernel", "kernel": name,
                           "args": [[a if isinstance(a, str) else self.value(a), s] for a, s in args],
                           "params": params, "out": self.value(node), "out_kernel_shape": out_sym,
                           "out_shape": self.sym[node], "dtype": self.dtype[node]})

    def as_int32(self, node):
        """The value of ``node`` as int32 (a host-side cast step when it is narrower)."""
        if self.dtype[node] == "int32":
            return self.value(node)
        name = f"{self.value(node)}_i32"
        self.steps.append({"op": "cast", "src": self.value(node), "out": name, "dtype": "int32"})
        return name


def _name(node, op):
    return f"{op.replace('int.', '')}_{node.name}".replace(".", "_")


def _emit_conv2d(b: KernelBuilder, node, mod: IntConv2d):
    b.range[node] = _acc_range(mod.weight, mod.bias, b.range.get(node.args[0]))
    offset = byte_offset(b.range.get(node.args[0])) if b.isa else None
    if offset is not None:
        return emit_conv2d_vnni(b, node, mod, offset)
    x = node.args[0]
    B, C, H, W = b.sym[x]
    O, _, K, _ = mod.weight.shape
    _, _, Ho, Wo = (d[0] for d in b.sym[node])
    s, p = mod.stride, mod.padding
    name = _name(node, "int.conv2d")
    xdt = b.dtype[x]
    lines = _header(name, [("X", ("m", C[0], H[0], W[0]), xdt), ("Wt", (O, C[0], K, K), "int8")]
                    + ([("Bs", (O,), "int32")] if mod.bias is not None else [])
                    + [("Y", ("m", O, Ho, Wo), "int32")])
    init = "Bs[o]" if mod.bias is not None else "0"
    load = (f'T.Cast("int32", X[bi, c, i * {s} + u - {p}, j * {s} + v - {p}]) * T.Cast("int32", Wt[o, c, u, v])')
    lines += ["    for bi in T.parallel(m):",
              f"        for o, i, j in T.grid({O}, {Ho}, {Wo}):",
              f"            Y[bi, o, i, j] = {init}",
              f"            for c, u, v in T.grid({C[0]}, {K}, {K}):"]
    if p:
        lines += [f"                if {p} <= i * {s} + u and i * {s} + u < {H[0] + p} and "
                  f"{p} <= j * {s} + v and j * {s} + v < {W[0] + p}:",
                  f"                    Y[bi, o, i, j] = Y[bi, o, i, j] + {load}"]
    else:
        lines.append(f"                Y[bi, o, i, j] = Y[bi, o, i, j] + {load}")
    keys = [f"{node.name}_weight"] + ([f"{node.name}_bias"] if mod.bias is not None else [])
    b.params[keys[0]] = mod.weight
    if mod.bias is not None:
        b.params[keys[1]] = mod.bias
    bsym = [B[0], B[1]]
    b.kernel(node, name, _parse(lines), [(x, [bsym, C, H, W])], keys, [bsym, [O, 0], [Ho, 0], [Wo, 0]])


def _emit_linear(b: KernelBuilder, node, mod: IntLinear):
    b.range[node] = _acc_range(mod.weight, mod.bias, b.range.get(node.args[0]))
    offset = byte_offset(b.range.get(node.args[0])) if b.isa else None
    if offset is not None:
        return emit_linear_vnni(b, node, mod, offset)
    x = node.args[0]
    *lead, F = b.sym[x]
    O = mod.weight.shape[0]
    name = _name(node, "int.linear")
    lines = _header(name, [("X", ("m", F[0]), b.dtype[x]), ("Wt", (O, F[0]), "int8")]
                    + ([("Bs", (O,), "int32")] if mod.bias is not None else []) + [("Y", ("m", O), "int32")])
    init = "Bs[o]" if mod.bias is not None else "0"
    lines += ["    for bi in T.parallel(m):",
              f"        for o in range({O}):",
              f"            Y[bi, o] = {init}",
              f"            for k in range({F[0]}):",
              '                Y[bi, o] = Y[bi, o] + T.Cast("int32", X[bi, k]) * T.Cast("int32", Wt[o, k])']
    keys = [f"{node.name}_weight"] + ([f"{node.name}_bias"] if mod.bias is not None else [])
    b.params[keys[0]] = mod.weight
    if mod.bias is not None:
        b.params[keys[1]] = mod.bias
    rows = _numel_sym(lead)
    b.kernel(node, name, _parse(lines), [(x, [rows, F])], keys, [rows, [O, 0]])


def _emit_pool(b: KernelBuilder, node, mod):
    x = node.args[0]
    B, C, H, W = b.sym[x]
    _, _, Ho, Wo = (d[0] for d in b.sym[node])
    k, s = mod.kernel, mod.stride
    is_sum = isinstance(mod, IntSumPool2d)
    xdt, ydt = b.dtype[x], ("int32" if is_sum else b.dtype[x])
    name = _name(node, "int.sum_pool2d" if is_sum else "int.max_pool2d")
    lines = _header(name, [("X", ("m", C[0], H[0], W[0]), xdt), ("Y", ("m", C[0], Ho, Wo), ydt)])
    # the k*k window as one expression, vectorised over the output row (no store per tap)
    taps = [f'T.Cast("{ydt}", X[bi, c, i * {s} + {u}, j * {s} + {v}])' for u in range(k) for v in range(k)]
    expr = taps[0]
    for t in taps[1:]:
        expr = f"{expr} + {t}" if is_sum else f"T.max({expr}, {t})"
    lines += ["    for bi in T.parallel(m):",
              f"        for c, i in T.grid({C[0]}, {Ho}):",
              f"            for j in T.vectorized({Wo}):" if b.codegen == "llvm" and Wo <= 64  # C: no vector types
              else f"            for j in range({Wo}):",
              f"                Y[bi, c, i, j] = {expr}"]
    bsym = [B[0], B[1]]
    b.kernel(node, name, _parse(lines), [(x, [bsym, C, H, W])], [], [bsym, C, [Ho, 0], [Wo, 0]], ydt)
    r = b.range.get(x)
    if r is not None:
        b.range[node] = (r[0] * k * k, r[1] * k * k) if is_sum else r


def _emit_add(b: KernelBuilder, node, mod: IntAdd):
    a, c = node.args[:2]
    n = _numel_sym(b.sym[node])
    name = _name(node, "int.add")
    lines = _header(name, [("A", ("m",), b.dtype[a]), ("B", ("m",), b.dtype[c]),
                           ("Y", ("m",), "int32")])
    lines += ["    for e in T.parallel(m):",
              f'        Y[e] = T.Cast("int32", A[e]) * {mod.mul_a} + T.Cast("int32", B[e]) * {mod.mul_b}']
    b.kernel(node, name, _parse(lines), [(a, [n]), (c, [n])], [], [n])
    ra, rc = b.range.get(a), b.range.get(c)
    if ra is not None and rc is not None:
        bound = abs(mod.mul_a) * max(map(abs, ra)) + abs(mod.mul_b) * max(map(abs, rc))
        b.range[node] = (-bound, bound)


def neuron_rule(node, mod: IntIF, sample, x_range):
    """``(NeuronScan, threshold values or None)`` of an integer neuron layer on int32 currents
    within ``x_range`` (None: unknown)."""
    for attr in ("v_reset", "v_init", "v_leak"):
        if not isinstance(getattr(mod, attr, 0), int):
            raise UnsupportedOp(f"tvm:int: {node_ref(node)} has a per-channel {attr}; the neuron scan kernel "
                                "takes one value per layer (quantize with per_channel=False)")
    th_fields, th_values = _threshold_layout(mod.v_th, sample)
    bound = None if x_range is None else max(-x_range[0], x_range[1])
    rule = NeuronScan(charge=_charge_rule(mod, bound), compare=mod.compare, reset=mod.reset_mode,
                      v_reset=mod.v_reset, v_init=mod.v_init, **th_fields)
    return rule, th_values


def _emit_neuron(b: KernelBuilder, node, mod: IntIF):
    """``IntIF`` / ``IntLIF`` (their docstrings are the spec) as the shared fused scan kernel."""
    x = node.args[0]
    Tn, *rest = b.sym[x]
    sample = tuple(d[0] for d in rest[1:])
    rule, th_values = neuron_rule(node, mod, sample, b.range.get(x))
    lanes = pick_lanes(math.prod(sample)) if b.codegen == "llvm" else 1  # C: no vector types
    name = _name(node, mod.op_name)
    func = neuron_scan_kernel(Tn[0], None, "int32", rule, lanes=lanes).with_attr("global_symbol", name)
    params = []
    if th_values is not None:
        params = [f"{node.name}_v_th"]
        b.params[params[0]] = th_values
    m_sym = _numel_sym(rest)
    b.kernel(node, name, func, [(b.as_int32(x), [Tn, m_sym])], params, [Tn, m_sym], dtype="int32")
    b.range[node] = (0, 1)


def _emit_readout(b: KernelBuilder, node, mod: IntReadout):
    x = node.args[0]
    Tn, *rest = b.sym[x]
    m_sym = _numel_sym(rest)
    name = _name(node, "int.readout")
    lines = _header(name, [("X", (Tn[0], "m"), b.dtype[x]), ("Y", ("m",), "int32")])
    lines += ["    for e in T.parallel(m):",
              "        Y[e] = 0",
              f"        for t in range({Tn[0]}):",
              '            Y[e] = Y[e] + T.Cast("int32", X[t, e])']
    b.kernel(node, name, _parse(lines), [(x, [Tn, m_sym])], [], [m_sym])


def _emit_broadcast(b, node, mod):
    b.dtype[node], b.range[node] = b.dtype[node.args[0]], b.range.get(node.args[0])
    b.steps.append({"op": "broadcast", "src": b.value(node.args[0]), "out": b.value(node),
                    "T": b.T, "out_shape": b.sym[node]})


def _emit_view(b, node, mod):
    b.dtype[node], b.range[node] = b.dtype[node.args[0]], b.range.get(node.args[0])
    b.steps.append({"op": "view", "src": b.value(node.args[0]), "out": b.value(node),
                    "out_shape": b.sym[node]})


def lower(gm: fx.GraphModule, codegen: str = "llvm", isa: str | None = None):
    """``(IRModule, plan, params)`` for integer-IR graph ``gm``; raises ``UnsupportedOp`` naming
    the first node that has no integer kernel. ``isa="avx512_vnni"``: conv / linear layers whose
    input fits a byte use the VNNI kernels of ``tvm_int_vnni`` (llvm codegen only)."""
    import tvm
    spec = graph_spec(gm)
    if not getattr(gm, "snnc_integer", None):
        raise UnsupportedOp("tvm:int compiles the integer IR: run snnc.passes.quantize_integer(gm) first")
    b = KernelBuilder(gm, codegen, isa if codegen == "llvm" else None)
    inputs, output = [], None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs.append(b.value(node))
            b.dtype[node] = _TIR_DTYPE.get(info(node).dtype)
            if b.dtype[node] == "int8":
                b.range[node] = (-128, 127)
            if b.dtype[node] is None:
                raise UnsupportedOp(f"tvm:int: input {node_ref(node)} is {info(node).dtype}, not an integer")
            continue
        if node in b.fused:
            continue
        if node.op == "output":
            output = node.args[0]
            if not isinstance(output, fx.Node):
                raise UnsupportedOp("tvm:int: the graph must return one tensor")
            continue
        rec = registry.lookup(gm, node)
        if not registry.has_hook(rec, "tvm:int"):
            name = rec.name if rec else op_name(gm, node)
            raise UnsupportedOp(f"tvm:int: {node_ref(node)} ({name}) has no integer kernel; supported: "
                                f"{', '.join(supported_ops())}")
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        registry.resolve(rec.hooks["tvm:int"])(b, node, mod)
    plan = {"inputs": inputs, "input_shapes": [b.sym[n] for n in gm.graph.nodes if n.op == "placeholder"],
            "output": b.value(output), "output_dtype": str(info(output).dtype).replace("torch.", ""), "steps": b.steps,
            "layout": spec["layout"], "T": b.T, "isa": b.isa or "portable"}
    return tvm.IRModule(b.funcs), plan, b.params
