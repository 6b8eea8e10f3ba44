"""Lowering of the integer IR (``snnc/ops/integer.py``) to TVM TIR: one PrimFunc per layer and a
host plan that calls them in graph order.

Each kernel is written as TVMScript text from a converter table (op name -> emitter), parsed
with TVM's script parser and built for ``llvm`` or ``c``. Every kernel is batch-agnostic (one
symbolic leading extent per kernel) and integer-only: int8 spikes/weights/input, int32 currents
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
from snnc.ops import IntAdd, IntConv2d, IntIF, IntLIF, IntLinear, IntMaxPool2d, IntReadout, IntSumPool2d
from snnc.printer import dtype_str

_TIR_DTYPE = {torch.int8: "int8", torch.int16: "int16", torch.int32: "int32", torch.int64: "int64"}
VIEW_OPS = ("time.merge", "time.split", "nn.flatten", "flatten", "view", "reshape", "contiguous")
KERNEL_OPS = ("int.conv2d", "int.linear", "int.sum_pool2d", "int.max_pool2d", "int.add", "int.if", "int.lif",
              "int.readout")


def supported_ops() -> list[str]:
    return sorted(KERNEL_OPS + VIEW_OPS + ("snn.direct_encoder",))


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


def _const(name, value, sample, params, what):
    """A per-neuron integer constant: an int64 literal, or a parameter buffer over one sample read
    at ``e % sample`` (per-channel constants are expanded to the sample's shape on the host)."""
    if isinstance(value, int):
        return _i64(value)
    key = f"{name}_{what}"
    params[key] = value.to(torch.int32).expand(*sample).contiguous().reshape(-1)
    return f'T.Cast("int64", {what}[e % {math.prod(sample)}])', (what, key)


class KernelBuilder:
    """Collects PrimFunc sources, parameters and plan steps while walking the graph."""

    def __init__(self, gm):
        self.gm = gm
        self.sym = symbolic_shapes(gm)
        self.sources: list[str] = []
        self.params: dict[str, torch.Tensor] = {}
        self.steps: list[dict] = []
        self.T = graph_spec(gm)["T"]

    def value(self, node):
        return f"v_{node.name}"

    def kernel(self, node, lines, args, params, out_sym):
        """Record a kernel: ``args`` = [(value node, kernel-view shape as sym)], ``params`` =
        param keys in signature order, ``out_sym`` = the kernel's output view shape."""
        self.sources.append("\n".join(lines))
        name = lines[1].split("(")[0][4:]
        self.steps.append({"op": "kernel", "kernel": name,
                           "args": [[self.value(a), s] for a, s in args], "params": params,
                           "out": self.value(node), "out_kernel_shape": out_sym,
                           "out_shape": self.sym[node], "dtype": _TIR_DTYPE[info(node).dtype]})


def _name(node, op):
    return f"{op.replace('int.', '')}_{node.name}".replace(".", "_")


def _emit_conv2d(b: KernelBuilder, node, mod: IntConv2d):
    x = node.args[0]
    B, C, H, W = b.sym[x]
    O, _, K, _ = mod.weight.shape
    _, _, Ho, Wo = (d[0] for d in b.sym[node])
    s, p = mod.stride, mod.padding
    name = _name(node, "int.conv2d")
    xdt = _TIR_DTYPE[info(x).dtype]
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
    b.kernel(node, lines, [(x, [bsym, C, H, W])], keys, [bsym, [O, 0], [Ho, 0], [Wo, 0]])


def _emit_linear(b: KernelBuilder, node, mod: IntLinear):
    x = node.args[0]
    *lead, F = b.sym[x]
    O = mod.weight.shape[0]
    name = _name(node, "int.linear")
    lines = _header(name, [("X", ("m", F[0]), _TIR_DTYPE[info(x).dtype]), ("Wt", (O, F[0]), "int8")]
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
    b.kernel(node, lines, [(x, [rows, F])], keys, [rows, [O, 0]])


def _emit_pool(b: KernelBuilder, node, mod):
    x = node.args[0]
    B, C, H, W = b.sym[x]
    _, _, Ho, Wo = (d[0] for d in b.sym[node])
    k, s = mod.kernel, mod.stride
    is_sum = isinstance(mod, IntSumPool2d)
    xdt, ydt = _TIR_DTYPE[info(x).dtype], _TIR_DTYPE[info(node).dtype]
    name = _name(node, "int.sum_pool2d" if is_sum else "int.max_pool2d")
    lines = _header(name, [("X", ("m", C[0], H[0], W[0]), xdt), ("Y", ("m", C[0], Ho, Wo), ydt)])
    first = f"X[bi, c, i * {s}, j * {s}]"
    upd = (f'Y[bi, c, i, j] + T.Cast("{ydt}", X[bi, c, i * {s} + u, j * {s} + v])' if is_sum
           else f"T.max(Y[bi, c, i, j], X[bi, c, i * {s} + u, j * {s} + v])")
    init = f'T.Cast("{ydt}", 0)' if is_sum else first
    lines += ["    for bi in T.parallel(m):",
              f"        for c, i, j in T.grid({C[0]}, {Ho}, {Wo}):",
              f"            Y[bi, c, i, j] = {init}",
              f"            for u, v in T.grid({k}, {k}):",
              f"                Y[bi, c, i, j] = {upd}"]
    bsym = [B[0], B[1]]
    b.kernel(node, lines, [(x, [bsym, C, H, W])], [], [bsym, C, [Ho, 0], [Wo, 0]])


def _emit_add(b: KernelBuilder, node, mod: IntAdd):
    a, c = node.args[:2]
    n = _numel_sym(b.sym[node])
    name = _name(node, "int.add")
    lines = _header(name, [("A", ("m",), _TIR_DTYPE[info(a).dtype]), ("B", ("m",), _TIR_DTYPE[info(c).dtype]),
                           ("Y", ("m",), "int32")])
    lines += ["    for e in T.parallel(m):",
              '        Y[e] = T.Cast("int32", A[e]) + T.Cast("int32", B[e])']
    b.kernel(node, lines, [(a, [n]), (c, [n])], [], [n])


def _emit_neuron(b: KernelBuilder, node, mod: IntIF):
    """The scan over T of ``IntIF`` / ``IntLIF`` (their docstrings are the spec), one neuron per
    iteration of a parallel loop; V[e] carries the membrane between steps."""
    x = node.args[0]
    Tn, *rest = b.sym[x]
    sample = tuple(d[0] for d in rest[1:])
    m_sym = _numel_sym(rest)
    name = _name(node, mod.op_name)
    params, extra = {}, []

    def const(attr):
        r = _const(node.name, getattr(mod, attr), sample, params, attr)
        if isinstance(r, tuple):
            extra.append(r[1])
            return r[0]
        return r
    th, vr, vi = const("v_th"), const("v_reset"), const("v_init")
    lo, hi = mod.state_range
    if isinstance(mod, IntLIF):
        vl = const("v_leak")
        if mod.leak_mode == "shift":
            leaked = f"{vl} + d - (d >> {_i64(mod.shift)})"
        else:
            leaked = f"{vl} + ((d * {_i64(mod.decay_q)} + {_i64(1 << (mod.frac_bits - 1))}) >> {_i64(mod.frac_bits)})"
        leak_lines = [f'            d: T.int64 = T.Cast("int64", V[e]) - {vl}',
                      f"            h: T.int64 = T.max(T.min({leaked} + T.Cast(\"int64\", X[t, e]), {_i64(hi)}), {_i64(lo)})"]
    else:
        leak_lines = [f'            h: T.int64 = T.max(T.min(T.Cast("int64", V[e]) + T.Cast("int64", X[t, e]), '
                      f"{_i64(hi)}), {_i64(lo)})"]
    cmp = ">=" if mod.compare == ">=" else ">"
    after = f"h - {th}" if mod.reset_mode == "subtract" else vr
    args = [("X", (Tn[0], "m"), _TIR_DTYPE[info(x).dtype])]
    args += [(attr, (math.prod(sample),), "int32") for attr, _ in extra]
    args += [("S", (Tn[0], "m"), "int8")]
    lines = _header(name, args)
    lines += ['    V = T.alloc_buffer((m,), "int32")',
              "    for e in T.parallel(m):",
              f'        V[e] = T.Cast("int32", {vi})',
              f"        for t in range({Tn[0]}):", *leak_lines,
              f"            s: T.bool = h {cmp} {th}",
              "            S[t, e] = T.Select(s, T.int8(1), T.int8(0))",
              f'            V[e] = T.Cast("int32", T.Select(s, {after}, h))']
    b.params.update(params)
    b.kernel(node, lines, [(x, [Tn, m_sym])], [key for _, key in extra], [Tn, m_sym])


def _emit_readout(b: KernelBuilder, node, mod: IntReadout):
    x = node.args[0]
    Tn, *rest = b.sym[x]
    m_sym = _numel_sym(rest)
    name = _name(node, "int.readout")
    lines = _header(name, [("X", (Tn[0], "m"), _TIR_DTYPE[info(x).dtype]), ("Y", ("m",), "int32")])
    lines += ["    for e in T.parallel(m):",
              "        Y[e] = 0",
              f"        for t in range({Tn[0]}):",
              '            Y[e] = Y[e] + T.Cast("int32", X[t, e])']
    b.kernel(node, lines, [(x, [Tn, m_sym])], [], [m_sym])


EMITTERS = {IntConv2d: _emit_conv2d, IntLinear: _emit_linear, IntSumPool2d: _emit_pool, IntMaxPool2d: _emit_pool,
            IntAdd: _emit_add, IntIF: _emit_neuron, IntLIF: _emit_neuron, IntReadout: _emit_readout}


def lower(gm: fx.GraphModule):
    """``(tvmscript_source, plan, params)`` for integer-IR graph ``gm``; raises ``UnsupportedOp``
    naming the first node that has no integer kernel."""
    spec = graph_spec(gm)
    if not getattr(gm, "snnc_integer", None):
        raise UnsupportedOp("tvm:int compiles the integer IR: run snnc.passes.quantize_integer(gm) first")
    b = KernelBuilder(gm)
    inputs, output = [], None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs.append(b.value(node))
            continue
        if node.op == "output":
            output = node.args[0]
            if not isinstance(output, fx.Node):
                raise UnsupportedOp("tvm:int: the graph must return one tensor")
            continue
        name = op_name(gm, node)
        mod = gm.get_submodule(node.target) if node.op == "call_module" else None
        emit = EMITTERS.get(type(mod))
        if emit is not None:
            emit(b, node, mod)
        elif name == "snn.direct_encoder":
            b.steps.append({"op": "broadcast", "src": b.value(node.args[0]), "out": b.value(node),
                            "T": b.T, "out_shape": b.sym[node]})
        elif name in VIEW_OPS:
            b.steps.append({"op": "view", "src": b.value(node.args[0]), "out": b.value(node),
                            "out_shape": b.sym[node]})
        else:
            raise UnsupportedOp(f"tvm:int: {node_ref(node)} ({name}) has no integer kernel; supported: "
                                f"{', '.join(supported_ops())}")
    plan = {"inputs": inputs, "input_shapes": [b.sym[n] for n in gm.graph.nodes if n.op == "placeholder"],
            "output": b.value(output), "output_dtype": dtype_str(info(output).dtype), "steps": b.steps,
            "layout": spec["layout"], "T": b.T}
    source = "\n\n".join(b.sources)
    return source, plan, b.params
