"""int8 x uint8 -> int32 conv / linear kernels for ``tvm:int`` on AVX-512 VNNI (``vpdpbusd``).

Why: the integer graph's conv / linear inputs are 0/1 spikes, small non-negative sums of spikes
(sum pooling) or the int8 graph input, and its weights are int8 (``quantize_integer``). One
``vpdpbusd`` multiplies 64 unsigned bytes by 64 signed bytes and adds each group of four products
into one of 16 int32 lanes: 64 exact multiply-adds per instruction, against 16 for an int32
vector multiply-add. The integer result is the same bit for bit (integer sums are exact; int32
lanes wrap like the portable kernel's int32 accumulator, and ``quantize_integer`` proved the
true sums fit).

Layouts (chosen so the inner loop is one broadcast load, one weight load per 16 output channels
and one ``vpdpbusd``):

* data ``P[m, C4, Hp, Wp]`` (linear: ``P[m, F4]``): each int32 word holds four input channels
  ``4c..4c+3`` as bytes, zero-padded spatially and to a multiple of 4 channels; a ``pack`` kernel
  writes it from the NCHW value (so the plan between layers stays NCHW and every other kernel
  is unchanged);
* weights ``Wp[OB, K, K, C4, 64]`` (linear: ``Wp[OB, F4, 64]``): the 16 output channels of
  block ``ob`` times the 4 input channels of word ``c``, ``Wp[.., 4*o + k] = W[16*ob + o, 4*c + k]``
  (zero where ``o`` or ``c`` is padding), packed once on the host.

Signed int8 data (the graph input) goes in with an offset: ``x + 128`` is in ``[0, 255]`` and
``sum W (x + 128) - 128 sum W = sum W x``; the padding bytes hold 128 too (x = 0), so the
correction ``-128 * sum_{c,u,v} W[o]`` is the same at every output position and folds into the
bias. Data whose range is not known to fit a byte (an int32 membrane sum, a residual add) keeps
the portable kernel.

The kernel is compiled for the host CPU (``mcpu``); ``int8_isa()`` decides at compile time and
again when an artefact is loaded (``tvm_int.load`` falls back to the portable library on a CPU
without VNNI). AMX-INT8 tiles are not used (not measured): TVM 0.27 ships no AMX tensor
intrinsics (its x86 table, ``tvm.s_tir.tensor_intrin.x86``, holds the VNNI and AVX-512 dot
products only), and tile configuration from TIR would be hand-written LLVM intrinsics.
"""
from __future__ import annotations

import torch

ISA_FLAG = "avx512_vnni"
_VPDPBUSD = "llvm.x86.avx512.vpdpbusd.512"  # (<16 x i32> acc, <64 x i8> u8 data, <64 x i8> s8 weights)
_MAX_TILE = 8  # accumulators per inner loop (zmm registers: 8 acc + weights + broadcast)


def int8_isa(features=None) -> str | None:
    """``"avx512_vnni"`` when this CPU (or the given /proc/cpuinfo feature list) has it, else None."""
    if features is None:
        from .tvm_build import host_isa
        features = host_isa()["features"]
    return ISA_FLAG if ISA_FLAG in features else None


def byte_offset(value_range) -> int | None:
    """0 for data in [0, 255], 128 for data in [-128, 127], None when the data may not fit a byte."""
    if value_range is None:
        return None
    lo, hi = value_range
    if lo >= 0 and hi <= 255:
        return 0
    if lo >= -128 and hi <= 127:
        return 128
    return None


def _tile(n: int) -> int:
    """The largest divisor of ``n`` that is at most ``_MAX_TILE`` (output columns per inner loop)."""
    return max(d for d in range(1, min(n, _MAX_TILE) + 1) if n % d == 0)


def _pack_bytes(value, index, C, offset):
    """The int32 word of four channel bytes ``((x[4c+k] + offset) & 255) << 8k`` for k = 0..3."""
    parts = []
    for k in range(4):
        ch = f"c * 4 + {k}"
        x = f"T.Cast(\"int32\", {value(f'T.min({ch}, {C - 1})')})"
        byte = f"(({x} + {offset}) & 255)" if offset else x
        parts.append(f"(T.if_then_else({ch} < {C}, {byte}, 0) << {8 * k})")
    return " | ".join(parts)


def _vpdpbusd(acc, word, weights):
    return (f"T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(\"{_VPDPBUSD}\"), {acc}, "
            f"T.reinterpret(T.broadcast({word}, 16), dtype=\"int8x64\"), {weights}, dtype=\"int32x16\")")


def _packed_weights(w: torch.Tensor, bias, offset):
    """``(Wp, bias')``: ``w`` ``[O, C, K, K]`` int8 as ``[OB, K, K, C4, 64]`` (see the module
    docstring) and the int32 bias with the offset correction, padded to ``16 * OB``."""
    O, C, K, _ = w.shape
    OB, C4 = -(-O // 16), -(-C // 4)
    wp = torch.zeros(OB * 16, C4 * 4, K, K, dtype=torch.int8)
    wp[:O, :C] = w
    wp = wp.reshape(OB, 16, C4, 4, K, K).permute(0, 4, 5, 2, 1, 3).contiguous().reshape(OB, K, K, C4, 64)
    b = torch.zeros(OB * 16, dtype=torch.int64)
    if bias is not None:
        b[:O] = bias.long()
    b[:O] -= offset * w.long().sum(dim=(1, 2, 3))
    return wp, b.to(torch.int32)


def emit_conv2d(b, node, mod, offset: int):
    """``IntConv2d`` as pack + VNNI conv (NCHW in, NCHW int32 out)."""
    from .tvm_int_lower import _header, _name, _parse
    x = node.args[0]
    B, C, H, W = b.sym[x]
    C, H, W = C[0], H[0], W[0]
    O, _, K, _ = mod.weight.shape
    _, _, Ho, Wo = (d[0] for d in b.sym[node])
    s, p = mod.stride, mod.padding
    OB, C4, Hp, Wp = -(-O // 16), -(-C // 4), H + 2 * p, W + 2 * p
    name = _name(node, "int.conv2d")
    bsym = [B[0], B[1]]

    pack = _header(f"{name}_pack", [("X", ("m", C, H, W), b.dtype[x]), ("P", ("m", C4, Hp, Wp), "int32")])
    word = _pack_bytes(lambda ch: f"X[bi, {ch}, i - {p}, j - {p}]", None, C, offset)
    pad_word = (offset & 255) * 0x01010101
    pad_word = pad_word - (1 << 32) if pad_word >= 1 << 31 else pad_word
    inside = f"{p} <= i and i < {H + p} and {p} <= j and j < {W + p}" if p else "True"
    pack += ["    for bi in T.parallel(m):",
             f"        for c, i in T.grid({C4}, {Hp}):",
             f"            for j in T.vectorized({Wp}):",
             f"                P[bi, c, i, j] = T.if_then_else({inside}, {word}, {pad_word})"]
    packed = f"{b.value(node)}_packed"
    b.funcs[f"{name}_pack"] = _parse(pack)
    b.steps.append({"op": "kernel", "kernel": f"{name}_pack", "args": [[b.value(x), [bsym, [C, 0], [H, 0], [W, 0]]]],
                    "params": [], "out": packed, "out_kernel_shape": [bsym, [C4, 0], [Hp, 0], [Wp, 0]],
                    "out_shape": [bsym, [C4, 0], [Hp, 0], [Wp, 0]], "dtype": "int32"})

    wp, bias = _packed_weights(mod.weight, mod.bias, offset)
    keys = [f"{node.name}_weight_vnni", f"{node.name}_bias_vnni"]
    b.params[keys[0]], b.params[keys[1]] = wp, bias
    P_sym = [bsym, [C4, 0], [Hp, 0], [Wp, 0]]
    fusable = _neuron_after(b, node)
    if fusable is not None:
        return _emit_conv_neuron(b, node, mod, fusable, packed, P_sym, keys)

    JW = _tile(Wo)
    acc = "acc[T.ramp(jj * 16, 1, 16)]"
    data = f"P[bo // {OB}, c, i * {s} + u, (jb * {JW} + jj) * {s} + v]"
    conv = _header(name, [("P", ("m", C4, Hp, Wp), "int32"), ("Wt", (OB, K, K, C4, 64), "int8"),
                          ("Bs", (OB * 16,), "int32"), ("Y", ("m", O, Ho, Wo), "int32")])
    conv += [f"    for bo in T.parallel(m * {OB}):",
             f"        for i, jb in T.grid({Ho}, {Wo // JW}):",
             f'            acc = T.alloc_buffer(({JW * 16},), "int32", scope="local")',
             f"            for jj in T.unroll({JW}):",
             f"                {acc} = Bs[T.ramp(bo % {OB} * 16, 1, 16)]",
             f"            for c, u, v in T.grid({C4}, {K}, {K}):",
             f"                for jj in T.unroll({JW}):",
             f"                    {acc} = {_vpdpbusd(acc, data, f'Wt[bo % {OB}, u, v, c, T.ramp(0, 1, 64)]')}",
             "            for o in range(16):",
             f"                if bo % {OB} * 16 + o < {O}:",
             f"                    for jj in T.vectorized({JW}):",
             f"                        Y[bo // {OB}, bo % {OB} * 16 + o, i, jb * {JW} + jj] = acc[jj * 16 + o]"]
    b.kernel(node, name, _parse(conv), [(packed, P_sym)], keys, [bsym, [O, 0], [Ho, 0], [Wo, 0]])


def _neuron_after(b, node):
    """``(view node, neuron node, static)`` when ``node``'s only use is a ``time.split`` (static
    False: the conv ran on all T*N steps) or a direct encoder (static True: one input repeated
    over T) whose only use is an integer IF/LIF layer: then the neuron scan runs inside the conv
    kernel on the accumulators, and the int32 currents never go to memory."""
    from snnc.ops import IntIF
    from snnc.ops.coding import DirectEncoder, SplitTime
    users = list(node.users)
    if len(users) != 1 or users[0].op != "call_module":
        return None
    view = users[0]
    kind = type(b.gm.get_submodule(view.target))
    nxt = list(view.users)
    if kind not in (SplitTime, DirectEncoder) or len(nxt) != 1 or nxt[0].op != "call_module":
        return None
    neuron = nxt[0]
    mod = b.gm.get_submodule(neuron.target)
    if not isinstance(mod, IntIF) or any(not isinstance(getattr(mod, a, 0), int) for a in ("v_reset", "v_init", "v_leak")):
        return None
    static = kind is DirectEncoder
    rows = b.sym[node][0]
    if rows != ([1, 1] if static else [b.T, 1]) or b.sym[neuron][:2] != [[b.T, 0], [1, 1]]:
        return None
    return view, neuron, static


def _emit_conv_neuron(b, node, mod, fusable, packed, P_sym, keys):
    """conv + neuron scan in one kernel: per tile of 16 channels x JW columns, T conv steps, each
    followed by the neuron update on the accumulators (``tvm_kernels._rule``: the same charge /
    fire / reset expressions as the neuron scan kernel), spikes stored as int8 [T, N, O, H, W]
    (the reference's spike dtype; the kernels after it read any integer dtype)."""
    from .tvm_int_lower import _header, _name, _parse, neuron_rule
    from .tvm_kernels import _rule
    view, neuron, static = fusable
    nmod = b.gm.get_submodule(neuron.target)
    O, _, K, _ = mod.weight.shape
    _, _, Ho, Wo = (d[0] for d in b.sym[node])
    s = mod.stride
    C4 = P_sym[1][0]
    OB, Tn, JW = -(-O // 16), b.T, _tile(Wo)
    rule, th_values = neuron_rule(neuron, nmod, (O, Ho, Wo), b.range.get(node))
    charge, fire, reset = _rule(rule, "int32")
    name = _name(neuron, nmod.op_name) + "_fused"
    args = [("P", ((f"{Tn} * m" if not static else "m"), C4, P_sym[2][0], P_sym[3][0]), "int32"),
            ("Wt", (OB, K, K, C4, 64), "int8"), ("Bs", (OB * 16,), "int32")]
    params = list(keys)
    if th_values is not None:
        args.append(("VTH", (th_values.numel(),), "int32"))
        params.append(f"{neuron.name}_v_th")
        b.params[params[-1]] = th_values
    args.append(("Y", (Tn, "m", O, Ho, Wo), "int8"))  # spikes as int8: 4x less memory than the scan's int32
    th = "VTH" if th_values is not None else "None"
    # flat neuron index of element e = jj * 16 + o (for per-channel / per-position thresholds)
    idx = f"((bo // {OB} * {O} + bo % {OB} * 16 + e % 16) * {Ho} + i) * {Wo} + jb * {JW} + e // 16"
    row = "bo // {OB}" if static else f"t * m + bo // {OB}"
    acc = "acc[T.ramp(jj * 16, 1, 16)]"
    data = f"P[{row.format(OB=OB)}, c, i * {s} + u, (jb * {JW} + jj) * {s} + v]"
    conv = [f"for jj in T.unroll({JW}):",
            f"    {acc} = Bs[T.ramp(bo % {OB} * 16, 1, 16)]",
            f"for c, u, v in T.grid({C4}, {K}, {K}):",
            f"    for jj in T.unroll({JW}):",
            f"        {acc} = {_vpdpbusd(acc, data, f'Wt[bo % {OB}, u, v, c, T.ramp(0, 1, 64)]')}"]
    lines = _header(name, args)
    lines += [f"    for bo in T.parallel(m * {OB}):",
              f"        for i, jb in T.grid({Ho}, {Wo // JW}):",
              f'            acc = T.alloc_buffer(({JW * 16},), "int32", scope="local")',
              f'            hb = T.alloc_buffer(({JW * 16},), "int32", scope="local")']
    lines += [" " * 12 + ln for ln in conv] if static else []
    lines += [f"            for t in range({Tn}):"]
    lines += [] if static else [" " * 16 + ln for ln in conv]
    lines += ["                if t == 0:",
              f"                    for e in T.vectorized({JW * 16}):",
              f"                        hb[e] = charge(init, acc[e], {idx}, {th})",
              "                else:",
              f"                    for e in T.vectorized({JW * 16}):",
              f"                        hb[e] = charge(reset(hb[e], {idx}, {th}), acc[e], {idx}, {th})",
              "                for o in range(16):",
              f"                    if bo % {OB} * 16 + o < {O}:",
              f"                        for jj in T.vectorized({JW}):",
              f"                            Y[t, bo // {OB}, bo % {OB} * 16 + o, i, jb * {JW} + jj] = "
              f"T.Cast(\"int8\", fire(hb[jj * 16 + o], {idx.replace('e % 16', 'o').replace('e // 16', 'jj')}, {th}))"]
    from tvm.script import tirx as T
    func = _parse(lines, {"charge": charge, "fire": fire, "reset": reset, "init": T.int32(rule.v_init)})
    b.fused.update({view, neuron})
    b.dtype[view] = "int32"
    b.range[neuron] = (0, 1)
    out_sym = [[Tn, 0], [1, 1], [O, 0], [Ho, 0], [Wo, 0]]
    b.kernel(neuron, name, func, [(packed, P_sym)], params, out_sym, dtype="int8")


def emit_linear(b, node, mod, offset: int):
    """``IntLinear`` as pack + VNNI matrix product over row tiles (``[rows, F]`` -> ``[rows, O]``)."""
    from .tvm_int_lower import _header, _name, _numel_sym, _parse
    x = node.args[0]
    *lead, F = b.sym[x]
    F = F[0]
    O = mod.weight.shape[0]
    OB, F4 = -(-O // 16), -(-F // 4)
    rows = _numel_sym(lead)
    name = _name(node, "int.linear")

    pack = _header(f"{name}_pack", [("X", ("m", F), b.dtype[x]), ("P", ("m", F4), "int32")])
    pack += ["    for bi in T.parallel(m):",
             f"        for c in range({F4}):",
             f"            P[bi, c] = {_pack_bytes(lambda ch: f'X[bi, {ch}]', None, F, offset)}"]
    packed = f"{b.value(node)}_packed"
    b.funcs[f"{name}_pack"] = _parse(pack)
    b.steps.append({"op": "kernel", "kernel": f"{name}_pack", "args": [[b.value(x), [rows, [F, 0]]]],
                    "params": [], "out": packed, "out_kernel_shape": [rows, [F4, 0]],
                    "out_shape": [rows, [F4, 0]], "dtype": "int32"})

    R = _MAX_TILE
    acc = "acc[T.ramp(rr * 16, 1, 16)]"
    weights = "Wt[ob, c, T.ramp(0, 1, 64)]"

    def tile(rows_expr, n, indent):
        pad = " " * indent
        return [f'{pad}acc = T.alloc_buffer(({n * 16},), "int32", scope="local")',
                f"{pad}for rr in T.unroll({n}):",
                f"{pad}    {acc} = Bs[T.ramp(ob * 16, 1, 16)]",
                f"{pad}for c in range({F4}):",
                f"{pad}    for rr in T.unroll({n}):",
                f"{pad}        {acc} = {_vpdpbusd(acc, f'P[{rows_expr} + rr, c]', weights)}",
                f"{pad}for rr in range({n}):",
                f"{pad}    for o in T.vectorized(16):" if O % 16 == 0 else f"{pad}    for o in range(16):",
                f"{pad}        if ob * 16 + o < {O}:",
                f"{pad}            Y[{rows_expr} + rr, ob * 16 + o] = acc[rr * 16 + o]"]
    lin = _header(name, [("P", ("m", F4), "int32"), ("Wt", (OB, F4, 64), "int8"),
                         ("Bs", (OB * 16,), "int32"), ("Y", ("m", O), "int32")])
    lin += [f"    for rb in T.parallel(m // {R} * {OB}):",
            f"        ob = rb % {OB}"] + tile(f"rb // {OB} * {R}", R, 8)
    lin += [f"    for rt in T.parallel((m % {R}) * {OB}):",  # the last m % R rows, one at a time
            f"        ob = rt % {OB}"] + tile(f"m // {R} * {R} + rt // {OB}", 1, 8)
    w4 = mod.weight.reshape(O, F, 1, 1)
    wp, bias = _packed_weights(w4, mod.bias, offset)
    keys = [f"{node.name}_weight_vnni", f"{node.name}_bias_vnni"]
    b.params[keys[0]], b.params[keys[1]] = wp.reshape(OB, F4, 64).contiguous(), bias
    b.kernel(node, name, _parse(lin), [(packed, [rows, [F4, 0]])], keys, [rows, [O, 0]])
