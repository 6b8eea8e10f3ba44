"""Fused spike blocks for the ``tvm:llvm`` hybrid: Conv2d + neuron scan as one call, with the
spikes between blocks kept as uint8 in channels_last memory, in the layout the int8 kernel reads.

Why (measured on the bench net, AMX host): the int8 conv itself is ~1/5 of an int8 layer's time;
the rest was memory traffic around it: an fp32 spike tensor written by the neuron, a
float->uint8 channels_last conversion before the conv, a conv output with one channel group per
weight digit and a pass summing the digits. A block instead

* reads uint8 spikes in "stacked digit" form: channels ``[254*s, s]`` (``2*C_in`` channels), so
  one u8 x s8 oneDNN conv with weights ``[q0 | q1]`` accumulates ``sum_k s_k*(254*q0_k + q1_k)``
  exactly in int32 and scales once by ``max|w_c| / (127*254)``: the two-digit weight of
  ``spike_conv.split_int8`` (same bound, ``SpikeConv2d.error_bound``) with C_out fp32 outputs
  instead of 2*C_out and no digit sum (254*1 fits uint8; int32 holds k*254*127*2);
* runs the conv on the whole T*N batch (or tiles of it for very large batches: whole time steps,
  or slices of one step's batch; ``SpikeBlock.tiles``), the neuron kernel after it, with the
  membrane in a buffer that persists across tiles;
* writes the spikes straight into the next block's input format (stacked uint8, or fp32 where
  something else reads them, e.g. the graph output).

The conv of a block runs fp32 (oneDNN, channels_last) or int8 by the same per-layer race as the
other convs (``choice``: "torch" / "int8"); int8 only where the input is proven 0/1. On a VNNI host
without AMX a third runner races too: "fused", conv and neuron in one TVM kernel reading and
writing padded uint8 spikes (``spike_fused.py``, with why).
"""
from __future__ import annotations

import threading

import torch
from torch import nn
from tvm.script import tirx as T

from snnc.report import fastest

from .spike_conv import HI, stack_spikes, stacked_int8  # noqa: F401 (re-exported: the block's digit form)
from .spike_fused import aligned, fused_block_kernel, padded_scan_kernel, padded_spikes, to_padded
from .tvm_kernels import NeuronScan, _rule, _size, pick_lanes

# fp32 conv output per conv call (SpikeBlock.tiles). Large on purpose: each conv -> kernel switch
# hands the cores from torch's OpenMP pool to TVM's, and the pool that just finished spin-waits
# on them; on the bench net (2 threads) 4 MiB tiles measured 2.2x the CPU time of whole-T calls,
# 16 MiB 1.2x, while the cache gain of small tiles showed only with one thread.
TILE_BYTES = 256 << 20


def block_scan_kernel(C: int, dtype: str, p: NeuronScan, out_dtype: str, copies: int):
    """PrimFunc ``(Y[G, R, C], V[R, C], S[G, R, copies*C], first)``: one group of G time steps of
    a neuron layer over conv outputs Y (channels_last: R = N*H*W rows of C channels), membrane V
    carried between groups (``first`` = 1: start from v_init), spikes S; with ``copies=2`` each
    spike is written as ``[254*s | s]`` (the stacked-digit input of the next int8 block).
    Same charge / fire / reset expressions as ``tvm_kernels.neuron_scan_kernel`` (bit for bit)."""
    if p.v_th == "buffer":
        raise ValueError("block_scan_kernel: scalar thresholds only")
    lanes = pick_lanes(C)
    charge, fire, reset = _rule(p, dtype)
    init = T.Cast(dtype, p.v_init)
    G, R = _size(None), T.Var("R", "int64")
    D = copies

    def spike(h, k):
        s = T.Cast(out_dtype, fire(h, 0))
        return T.Select(k == 0, s * T.Cast(out_dtype, HI), s) if D == 2 else s

    @T.prim_func(s_tir=True)
    def block_scan(y: T.handle, v: T.handle, s: T.handle, first: T.int32):
        T.func_attr({"tir.noalias": True})
        Y = T.match_buffer(y, (G, R, C), dtype)
        V = T.match_buffer(v, (R, C), dtype)
        S = T.match_buffer(s, (G, R, D * C), out_dtype)
        with T.sblock("root"):
            for r in T.parallel(R):
                for co in T.serial(C // lanes):
                    for ci in T.vectorized(lanes):
                        V[r, co * lanes + ci] = charge(T.Select(first == 1, init, reset(V[r, co * lanes + ci], 0)),
                                                       Y[0, r, co * lanes + ci], 0)
                    for k in T.unroll(D):
                        for ci in T.vectorized(lanes):
                            S[0, r, k * C + co * lanes + ci] = spike(V[r, co * lanes + ci], k)
                    for t in T.serial(1, G):
                        for ci in T.vectorized(lanes):
                            V[r, co * lanes + ci] = charge(reset(V[r, co * lanes + ci], 0),
                                                           Y[t, r, co * lanes + ci], 0)
                        for k in T.unroll(D):
                            for ci in T.vectorized(lanes):
                                S[t, r, k * C + co * lanes + ci] = spike(V[r, co * lanes + ci], k)
    return block_scan


class SpikeBlock(nn.Module):
    """``neuron(conv(x))`` over ``[T, N, C, H, W]``: conv per group of time steps (fp32 oneDNN or
    the stacked int8 kernel, ``choice``), then the neuron kernel on that group; output spikes in
    ``out_format`` ("f32": fp32 ``[T, N, C', H', W']`` in channels_last memory; "u8x2": uint8
    ``[T, N, 2C', H', W']``, the stacked input of the next int8 block; "u8pad": uint8
    ``[T, N, H'+2p, W'+2p, C']`` with ``p = out_pad``, the input of the next fused block). See
    the module doc. ``fused``: the ``spike_fused.FusedKernel`` of this conv where the "fused"
    runner is offered, else None; ``in_format``: what the producer writes ("f32" unless set)."""

    def __init__(self, conv: nn.Conv2d, in_shape, steps: int, name: str, kernels: dict, binary: bool,
                 reuse_output=True, fused=None):
        super().__init__()
        self.steps = steps
        self.conv, self.name, self.kernels = conv, name, kernels  # kernels: format -> kernel name
        self.in_shape, self.binary, self.reuse_output = tuple(in_shape), binary, reuse_output
        self.choice, self.out_format, self.fns, self.buffers = "torch", "f32", {}, {}
        self.fused, self.in_format, self.out_pad, self.pool = fused, "f32", None, {}
        self.fresh_output = False
        self.out_shape = tuple(conv(torch.zeros(1, *self.in_shape[1:])).shape[1:])
        self.weight = conv.weight.detach().contiguous(memory_format=torch.channels_last)
        self.bias = None if conv.bias is None else conv.bias.detach().float()
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        self.packed = None
        if binary:
            digits, self.scale, step = stacked_int8(conv.weight)
            self.zero_points = torch.zeros(self.scale.numel(), dtype=torch.int64)
            self.register_buffer("error_bound", conv.weight[0].numel() * step / 2, persistent=False)
            n, c, h, w = self.in_shape
            self.packed = torch.ops.onednn.qconv_prepack(digits, self.scale, 1.0, 0, *self.geometry, [n, 2 * c, h, w])

    def bind(self, lib):
        self.fns = {fmt: lib[name] for fmt, name in self.kernels.items()}

    def kernel_builders(self, rule: NeuronScan, dtype: str) -> dict:
        """``{kernel name: (builder, args, kwargs)}`` for every runner and output format this block
        may use, each name recorded in ``self.kernels`` (format -> name; "f32" names the scan):
        the scans writing fp32 and stacked uint8, the padded uint8 one where ``out_pad`` is set
        (every reader may run fused), and the fused runner's where ``fused`` is set."""
        c, h, w = self.out_shape
        scan, conv = self.kernels["f32"], self.conv
        out = {scan: (block_scan_kernel, (c, dtype, rule, "float32", 1), {}),
               scan + "_u8x2": (block_scan_kernel, (c, dtype, rule, "uint8", 2), {})}
        self.kernels["u8x2"] = scan + "_u8x2"
        if self.out_pad is not None:
            self.kernels["u8pad"] = scan + "_u8pad"
            out[scan + "_u8pad"] = (padded_scan_kernel, (c, h, w, self.out_pad, rule, dtype), {})
        for fmt in ("f32", "u8pad") if self.fused is not None else ():
            if fmt == "u8pad" and self.out_pad is None:
                continue
            one = self.fused.digits == 1   # (its own name: the library's key follows the kernel names)
            self.kernels["fused_" + fmt] = f"{self.name}_fused_{fmt}" + ("_d1" if one else "")
            out[self.kernels["fused_" + fmt]] = (fused_block_kernel, (
                self.in_shape[1], c, *self.in_shape[2:], *conv.kernel_size, conv.padding[0], self.steps, rule, fmt,
                self.out_pad or 0, self.fused.analog), {"digits": 1} if one else {})
        return out

    def options(self) -> list:
        return ["torch"] + (["int8"] if self.packed is not None else []) + \
            (["fused"] if self.fused is not None and "fused_f32" in self.fns else [])

    def _out(self, key, shape, dtype, pad=None):
        """A buffer for ``key``: preallocated per thread and shape, or for the caller's spikes
        (``fresh_output``) one that no tensor outside this block still uses (``_returnable``).
        ``pad``: a zeroed ``u8pad`` buffer for spikes of shape ``shape`` (the kernels write only its
        interior, so its border stays zero across calls)."""
        make = (lambda: padded_spikes(shape, pad, dtype or torch.uint8)) if pad is not None else \
            (lambda: torch.empty(shape, dtype=dtype))
        if not self.reuse_output:
            return make()
        key = (threading.get_ident(), key, tuple(shape), dtype, pad)  # per thread, as TVMKernelCall
        if key[1] == "s" and self.fresh_output:
            return _returnable(self.pool.setdefault(key, []), make)
        buf = self.buffers.get(key)
        if buf is None:
            buf = self.buffers[key] = make()
        return buf

    def _conv(self, x):
        if self.choice == "int8":
            stride, padding, dilation, groups = self.geometry
            return torch.ops.onednn.qconv2d_pointwise(x, 1.0, 0, self.packed, self.scale, self.zero_points, self.bias,
                                                      stride, padding, dilation, groups, 1.0, 0, torch.float32,
                                                      "none", [], "")
        return nn.functional.conv2d(x, self.weight, self.bias, *self.geometry)

    def forward(self, x):
        if self.choice == "fused":
            return self._fused(x)
        steps, n = x.shape[:2]
        cin = self.in_shape[1]
        if self.choice == "int8":
            x = x if x.dtype == torch.uint8 else stack_spikes(x)
        elif x.dtype == torch.uint8:  # stacked spikes reaching an fp32 conv: the low copy is 0/1
            x = x[:, :, cin:].float()
        x = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        c, h, w = self.out_shape
        copies, dtype = (2, torch.uint8) if self.out_format == "u8x2" else (1, torch.float32)
        padded = self.out_format == "u8pad"
        spikes = self._out("s", (steps, n, c, h, w), None, self.out_pad) if padded else \
            self._out("s", (steps, n * h * w, copies * c), dtype)
        membrane = self._out("v", (n * h * w, c), torch.float32)
        fn = self.fns[self.out_format]
        group, rows = self.tiles(steps, n)
        hw = h * w
        with torch.no_grad():
            for t0 in range(0, steps, group):
                g = min(group, steps - t0)
                for n0 in range(0, n, rows):  # rows < n only with g == 1: a slice of one step's batch
                    k = min(rows, n - n0)
                    y = self._conv(x[t0 * n + n0:(t0 + g) * n if k == n else t0 * n + n0 + k])
                    out = spikes[t0:t0 + g, n0:n0 + k] if padded else spikes[t0:t0 + g, n0 * hw:(n0 + k) * hw]
                    # (a conv on one input channel may come back NCHW: channels_last is ambiguous there, and
                    # the rows view would then be strided; the kernel takes compact rows only)
                    cur = y.permute(0, 2, 3, 1).reshape(g, k * hw, c).contiguous()
                    fn(cur, membrane[n0 * hw:(n0 + k) * hw], out, int(t0 == 0))
        return spikes if padded else spikes.view(steps, n, h, w, copies * c).permute(0, 1, 4, 2, 3)

    def _fused(self, x):
        """The "fused" runner: one TVM call over all T (no conv output, no tiles)."""
        steps, n = x.shape[:2]
        pad, k = self.conv.padding[0], self.fused
        if k.analog:  # the caller's fp32 [T, N, C, H, W]: the kernel pads it itself (no torch op here)
            x = aligned(x)
        elif self.in_format != "u8pad":  # another runner's spikes: fp32, or stacked uint8 (the low copy)
            cin = self.in_shape[1]
            spikes = x[:, :, cin:].float() if x.dtype == torch.uint8 else x
            x = to_padded(spikes, pad, self._out("x", (steps, n, cin, *self.in_shape[2:]), None, pad))
        c, h, w = self.out_shape
        if self.out_format == "u8pad":
            out = self._out("s", (steps, n, c, h, w), None, self.out_pad)
        else:
            out = self._out("s", (steps, n, h, w, c), torch.float32)
        self.fns["fused_" + ("u8pad" if self.out_format == "u8pad" else "f32")](
            x if k.analog else x.view(torch.int32), k.wq, k.scales, k.bias, out)
        return out if self.out_format == "u8pad" else out.permute(0, 1, 4, 2, 3)

    def tiles(self, steps, n):
        """``(time steps, samples)`` per conv call: the fp32 conv output of one call is at most
        ``TILE_BYTES`` (bounds the temporary; see its comment for the measured size), whole time
        steps when one fits, else a slice of one step's batch. Slices must start 64-byte aligned
        (TVM's buffers): otherwise one call does everything."""
        c, h, w = self.out_shape
        per_sample = h * w * c * 4
        if (h * w * c) % 64:
            return steps, n
        if n * per_sample <= TILE_BYTES:
            return max(1, min(steps, TILE_BYTES // (n * per_sample))), n
        return 1, max(1, TILE_BYTES // per_sample)

    def race(self, runs=2) -> str:
        """Time the block with each conv runner on spike-like input, each reading the spike format
        it gets from a block of its kind (stacked uint8 for "int8", padded uint8 for "fused"); the
        fastest one runs. Rounds interleave the runners (best of ``runs`` each), so a burst of load
        from elsewhere hits them alike. Returns the choice; ``race_ms`` keeps each runner's time."""
        spikes = (torch.rand(self.in_shape) < 0.2).float()
        x = spikes.reshape(self.steps, -1, *self.in_shape[1:])
        inputs = {}
        for choice in self.options():
            xin = stack_spikes(x) if choice == "int8" else (x if self.binary else torch.rand_like(x))
            if choice == "fused" and self.binary:
                xin = to_padded(x, self.conv.padding[0], padded_spikes(x.shape, self.conv.padding[0]))
            inputs[choice] = xin

        def runner(choice, xin):
            def run():
                self.choice, self.in_format = choice, "u8pad" if choice == "fused" else "f32"
                self(xin)
            return run
        winner, best = fastest({choice: runner(choice, xin) for choice, xin in inputs.items()}, runs)
        self.buffers.clear()
        self.pool.clear()
        self.choice, self.in_format = "torch", "f32"
        self.race_ms = {k: round(v * 1e3, 2) for k, v in best.items()}
        return winner


POOL = 2  # returned spike tensors kept for reuse per shape: a caller holding the last result still gets a free one


def _returnable(pool: list, make):
    """A buffer from ``pool`` that nothing but the pool uses (storage use count as at creation:
    the caller dropped every view of it), else a new one (pooled while the pool has room).

    Why: a large fresh tensor is zero-filled page by page by the kernel on first write (one fault
    per 4 KiB); on the bench net the returned spikes' faults were ~1/4 of a call's CPU time. The
    check is the one torch.compile's CUDA-graph trees use for their outputs
    (``torch._C._storage_Use_Count``), so a buffer is reused only once the caller cannot see it."""
    for buf, count in pool:
        if torch._C._storage_Use_Count(buf.untyped_storage()._cdata) <= count:
            return buf
    buf = make()
    if len(pool) < POOL:
        pool.append((buf, torch._C._storage_Use_Count(buf.untyped_storage()._cdata)))
    return buf




def set_spike_formats(g) -> None:
    """For the blocks of hybrid graph ``g``: each writes stacked uint8 spikes where every reader is
    an int8 block, padded uint8 where every reader runs fused, fp32 otherwise, and a fresh tensor
    where the graph returns its spikes; each reader block learns the format it reads."""
    blocks = [n for n in g.graph.nodes if n.op == "call_module" and isinstance(g.get_submodule(n.target), SpikeBlock)]
    for node in blocks:
        g.get_submodule(node.target).in_format = "f32"
    for node in blocks:
        readers = [g.get_submodule(u.target) if u.op == "call_module" else None for u in node.users]
        kinds = {r.choice if isinstance(r, SpikeBlock) else None for r in readers}
        block = g.get_submodule(node.target)
        block.out_format = {"int8": "u8x2" if block.choice != "fused" else "f32",  # the fused kernel has no u8x2
                            "fused": "u8pad" if block.out_pad is not None else "f32"}.get(
            kinds.pop() if len(kinds) == 1 else None, "f32")
        for r in readers:
            if isinstance(r, SpikeBlock):
                r.in_format = block.out_format
        # spikes the caller gets: a fresh tensor each call, not a reused buffer run_hybrid copies
        block.fresh_output = any(u.op == "output" for u in node.users)
