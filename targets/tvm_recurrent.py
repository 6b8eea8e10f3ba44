"""The recurrent scan: one TIR kernel over T for a neuron layer whose input at step t adds a
term computed from its own output at t-1 (snntorch's ``RLeaky`` / ``RSynaptic``, NIR's recurrent
edges ``snn.feedback``): the kernel builder, the neuron's step as a TIR rule, and the Relax
converter. The op says what to scan through its record's ``recurrent_scan`` hook (the neuron, its
update, the initial state and the path: a square ``nn.Linear`` or an elementwise weight); the hybrid
mode (``tvm_hybrid.py``) calls the same kernel on torch buffers.

Why one kernel: the recurrence makes the T loop sequential through a matrix product, so without it
each step is a separate matmul plus elementwise update (the exported forward, T times); here each
row of the batch walks t = 0..T-1 with its state in a local buffer, and the product skips the
previous step's zero outputs (spikes are sparse).
"""
from __future__ import annotations

import math

import torch
from tvm import relax
from tvm.script import tirx as T


from .tvm_kernels import _size, select_k, state_of
from .tvm_lower import (_Constants, _dims, _prod, _reshape, _seq_shape, _TIRMath, multi_state, opaque,
                        plain_arithmetic, recurrent_scan)


def recurrent_scan_kernel(T_steps: int, M: int | None, F: int, dtype: str, update, init, path: str):
    """PrimFunc ``(X[T, M], P..., S[T, M])``: the fused scan of a recurrent neuron layer, whose input
    at step t adds a recurrent term computed from its own output at t-1 (snntorch's ``RLeaky`` /
    ``RSynaptic``, NIR's cyclic edges): ``M = R * F``, R rows (samples, or the leading dims of a
    linear recurrence) of F features. ``path``:

        "linear" / "linear_bias":  P = (WT[F, F], [B[F]]),  REC[f] = sum_g S[t-1, g] WT[g, f]  (+ B[f])
        "elementwise":              P = (V[F],),             REC[f] = S[t-1, f] V[f]
        (REC = 0 at t = 0, plus the bias: the previous output starts at zero)

    ``update(x, rec, state) -> (out, new_state)`` builds the neuron's step on TIR values; ``init``
    lists each state variable's initial value. ``WT`` is the Linear weight transposed (``[in, out]``)
    so the product's inner loop runs over contiguous memory; rows whose previous output is 0 are
    skipped (adding ``0 * w`` changes no value), so sparse spikes cost little. Rows run in
    parallel, one row's state lives in a local buffer while it walks t = 0..T-1 (the sum order is
    ascending g, not BLAS's: a linear path agrees with torch to float rounding, not bit for bit)."""
    K = len(init)
    init = [T.Cast(dtype, v) for v in init]
    zero = T.Cast(dtype, 0)
    Mv = _size(M)

    def spike(x, rec, ST, f):
        return update(x, rec, state_of(ST, f, K))[0]

    def new_state(x, rec, ST, f, k):
        return select_k(k, update(x, rec, state_of(ST, f, K))[1])

    def initial(k):
        return select_k(k, init)

    if path == "elementwise":
        @T.prim_func(s_tir=True)
        def recurrent_scan(x: T.handle, v: T.handle, s: T.handle):
            T.func_attr({"tir.noalias": True})
            X = T.match_buffer(x, (T_steps, Mv), dtype)
            V = T.match_buffer(v, (F,), dtype)
            S = T.match_buffer(s, (T_steps, Mv), dtype)
            with T.sblock("root"):
                for r in T.parallel(Mv // F):
                    with T.sblock("row"):
                        T.reads(X[0:T_steps, r * F:r * F + F], V[0:F])
                        T.writes(S[0:T_steps, r * F:r * F + F])
                        ST = T.alloc_buffer((K, F), dtype, scope="local")
                        NEW = T.alloc_buffer((K, F), dtype, scope="local")
                        REC = T.alloc_buffer((F,), dtype, scope="local")
                        for k in T.serial(K):
                            for f in T.serial(F):
                                ST[k, f] = initial(k)
                        for t in T.serial(T_steps):
                            for f in T.serial(F):
                                REC[f] = zero
                                if t > 0:
                                    REC[f] = S[t - 1, r * F + f] * V[f]
                            for f in T.serial(F):
                                S[t, r * F + f] = spike(X[t, r * F + f], REC[f], ST, f)
                                for k in T.serial(K):
                                    NEW[k, f] = new_state(X[t, r * F + f], REC[f], ST, f, k)
                                for k in T.serial(K):
                                    ST[k, f] = NEW[k, f]
        return recurrent_scan
    if path not in ("linear", "linear_bias"):
        raise ValueError(f"recurrent_scan_kernel: path={path!r}; expected 'linear', 'linear_bias' or 'elementwise'")
    bias = path == "linear_bias"

    @T.prim_func(s_tir=True)
    def recurrent_scan(x: T.handle, w: T.handle, b: T.handle, s: T.handle):
        T.func_attr({"tir.noalias": True})
        X = T.match_buffer(x, (T_steps, Mv), dtype)
        WT = T.match_buffer(w, (F, F), dtype)
        B = T.match_buffer(b, (F,), dtype)
        S = T.match_buffer(s, (T_steps, Mv), dtype)
        with T.sblock("root"):
            for r in T.parallel(Mv // F):
                with T.sblock("row"):
                    T.reads(X[0:T_steps, r * F:r * F + F], WT[0:F, 0:F], B[0:F])
                    T.writes(S[0:T_steps, r * F:r * F + F])
                    ST = T.alloc_buffer((K, F), dtype, scope="local")
                    NEW = T.alloc_buffer((K, F), dtype, scope="local")
                    REC = T.alloc_buffer((F,), dtype, scope="local")
                    for k in T.serial(K):
                        for f in T.serial(F):
                            ST[k, f] = initial(k)
                    for t in T.serial(T_steps):
                        for f in T.serial(F):
                            REC[f] = zero
                        if t > 0:
                            for g in T.serial(F):
                                if S[t - 1, r * F + g] != zero:
                                    for f in T.serial(F):
                                        REC[f] = REC[f] + S[t - 1, r * F + g] * WT[g, f]
                        if bias:
                            for f in T.serial(F):
                                REC[f] = REC[f] + B[f]
                        for f in T.serial(F):
                            S[t, r * F + f] = spike(X[t, r * F + f], REC[f], ST, f)
                            for k in T.serial(K):
                                NEW[k, f] = new_state(X[t, r * F + f], REC[f], ST, f, k)
                            for k in T.serial(K):
                                ST[k, f] = NEW[k, f]
    return recurrent_scan


def _single_state_update(neuron):
    """``update(view, x, [v], math)`` of a charge / fire / reset neuron (``snnc/ops/neurons.py``'s
    three phases, same ops), for a recurrent scan whose neuron keeps one membrane."""
    charge = type(neuron).charge

    def update(view, x, state, math):
        (v,) = state
        strict = view.compare == ">"
        h = charge(view, v, x)
        if view.reset_mode == "subtract_after_leak":
            h = h - view.v_th * math.heaviside(v - view.v_th, strict)
        s = math.heaviside(h - view.v_th, strict)
        if view.reset_mode == "subtract":
            v = h - view.v_th * s
        elif view.reset_mode == "zero":
            v = h * (1.0 - s) + view.v_reset * s
        else:
            v = h
        return s, (v,)
    return update


def recurrent_rule(mod, dtype="float32"):
    """``(rule(x, rec, state) -> (out, state), init, path)`` on TIR values for a recurrent op."""
    scan = recurrent_scan(mod)
    neuron = scan["neuron"]
    view, math_ = _Constants(neuron), _TIRMath(dtype)
    if scan["update"] is not None:
        update, init = scan["update"], scan["init"]
        step = lambda x, rec, st: update(view, x, tuple(st), math_, rec)  # noqa: E731
    else:   # snn.feedback: the neuron's own update on X[t] + path(Y[t-1])
        if multi_state(neuron):
            init = [float(t.reshape(-1)[0]) for t in neuron.initial_state(torch.zeros(1))]
            step = lambda x, rec, st: type(neuron).update(view, x + rec, tuple(st), math_)  # noqa: E731
        else:
            init, single = [float(neuron.v_init)], _single_state_update(neuron)
            step = lambda x, rec, st: single(view, x + rec, tuple(st), math_)  # noqa: E731
    return plain_arithmetic(neuron, step), init, scan["path"]


def recurrent_kernel(mod, shape, dtype, symbolic=True):
    """``(builder, args, kwargs, constants)`` of the recurrent scan of ``mod`` on ``[T, N, ...]``:
    the kernel sees ``[T, M]`` with M = rows * F (F: the recurrence's features)."""
    rule, init, path = recurrent_rule(mod, dtype)
    sample = tuple(int(d) for d in shape[2:])
    if path[0] == "linear":
        w, b = path[1].detach().float(), path[2]
        F = int(w.shape[0])
        consts = [w.t().contiguous(), torch.zeros(F) if b is None else b.detach().float().clone()]
        kind = "linear_bias"
    else:
        F = math.prod(sample)
        consts, kind = [torch.broadcast_to(torch.as_tensor(path[1]).detach().float(), sample).reshape(-1).contiguous()], \
            "elementwise"
    M = None if symbolic else int(math.prod(int(d) for d in shape[1:]))
    return recurrent_scan_kernel, (int(shape[0]), M, F, dtype, rule, init, kind), {}, consts


def convert_recurrent(imp, node, mod):
    """One ``call_tir`` of the recurrent scan: ``[T, N, ...] -> [T, M]``, the kernel, back."""
    (_, dtype), x = _seq_shape(node), imp.env[node.args[0]]
    shape = _dims(x)
    static = all(isinstance(d, int) for d in shape)
    builder, args, kw, consts = recurrent_kernel(mod, _seq_shape(node)[0], dtype, symbolic=not static)
    name = f"{type(mod).op_name.replace('.', '_')}_scan"
    gv = imp.block_builder.add_func(opaque(builder(*args, **kw)), name)
    bb = imp.block_builder
    steps, M = shape[0], _prod(shape[1:])
    flat = _reshape(bb, x, (steps, M))
    s = bb.emit(relax.call_tir(gv, [flat, *[relax.const(c.numpy().astype(dtype)) for c in consts]],
                               relax.TensorType((steps, M), dtype)))
    return _reshape(bb, s, shape)
