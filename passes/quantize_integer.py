"""quantize_integer: unrolled float SNN -> integer IR (int weights, int membrane, shift/fixed leak).

Follows neuromorphic practice (Loihi's fixed-point core, Davies 2018; SpiNNaker/DYNAP-style
integer neurons): every value in the result is an integer, every scale is folded away.

Assumes: an unrolled graph (``unroll_timesteps`` ran: ``gm.snnc_spec["T"]`` is set) of
conv2d / linear / avg_pool2d / max_pool2d / flatten / reshape / dropout / identity / add layers,
IF / LIF / ParametricLIF neurons (multi-step), a hoisted ``DirectEncoder``, time.merge/split and
readouts; BatchNorm already folded (``fold_bn``); no Poisson encoder (feed spikes as the input).

Guarantees (the *scale* of a value v is the float s with real value ~= s * v):
  * input: the float graph input x becomes an int8 input ``q = clamp(round(x / s_in), -Q, Q)``,
    ``Q = 2**(input_bits-1) - 1``, ``s_in = input_range / Q`` (``quantize_input`` does this;
    spike inputs in {0, 1} with ``input_range=Q`` pass through exactly);
  * conv / linear: the input scale is folded into the float weights (``W' = W * s_x``), which are
    quantized symmetrically to ``weight_bits``: ``s_w = max|W'| / (2**(bits-1) - 1)`` per layer
    (``per_channel=True``: per output channel, except for layers that feed a readout, where one
    scale keeps the integer logits comparable across classes), ``Wq = round(W' / s_w)``,
    ``bq = round(b / s_w)`` (int32); the output current has scale ``s_w``;
  * avg_pool2d becomes an integer sum pool; its ``1/k**2`` goes into the scale;
  * a residual add of two values on different scales is aligned: a conv/linear that feeds only
    the add is requantized onto the other operand's scale (or ``1/m`` of it, m an integer), so
    the add is ``a * ka + b * kb`` with small integer multipliers (``int.add {mul_b=m}``);
  * neurons: the membrane takes the input's scale (times the LIF input gain when
    ``decay_input``), so ``v_th``, ``v_reset``, ``v_init``, ``v_leak`` become integers
    ``round(v / s)`` (per channel when the scale is); the leak becomes
    ``leak="shift"``: ``D - (D >> k)`` with ``decay = 1 - 2**-k`` exactly (tau a power of two), or
    ``leak="fixed"``: ``(D * round(decay * 2**frac_bits) + 2**(frac_bits-1)) >> frac_bits``;
    the membrane is ``state_bits`` wide (default 24, Loihi's width: an int8 input times int8
    weights over a 3x3 fan-in already needs 18 bits) and saturates (``snnc/ops/integer.py``);
  * readouts sum over T in int32; ``gm.snnc_integer["output_scale"]`` maps the sum back to the
    float readout's mean (``y_float ~= y_int * output_scale``).
  * errors, never silent wrap-around: an op the integer IR cannot express names its node; a
    ``state_bits`` too small for a layer's worst-case input (threshold + the largest current its
    fan-in and weights can produce in one step) or an int32 accumulator that could overflow raises
    ``IntegerOverflowRisk`` with the bits needed.
The input graph is not modified; the result is a graph of ``snnc.ops.integer`` ops whose forward
is the integer reference interpreter.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import operator

import torch
from torch import fx, nn

from snnc.errors import SnncError, UnsupportedOp, node_ref
from snnc.ir import annotate, graph_spec, info, op_name
from snnc.ops import (DirectEncoder, IntAdd, IntConv2d, IntIF, IntLIF, IntLinear, IntMaxPool2d, IntReadout,
                      IntSumPool2d, MergeTime, Neuron, Readout, SplitTime, registry)
from snnc.ops.integer import INT32_MAX

from ._integer_scales import (IntegerOverflowRisk, Value, channel_dim, dequantize_output,  # noqa: F401
                              quantize_input, round_int, scale_view)

SUPPORTED = ("nn.conv2d", "nn.linear", "nn.avg_pool2d", "nn.max_pool2d", "nn.flatten", "flatten", "view",
             "reshape", "nn.dropout", "nn.identity", "add", "snn.if", "snn.lif", "snn.plif",
             "snn.direct_encoder", "snn.readout", "time.merge", "time.split")
_HINTS = {"nn.batch_norm": "fold it into the conv/linear first (snnc.passes.fold_bn)",
          "nn.relu": "this is an ANN op: convert the ANN to an SNN first (snnc.convert)",
          "snn.poisson_encoder": "encode spikes outside the graph and feed them as the input"}


def _integer_neuron(mod) -> bool:
    """A neuron whose op record has an ``int`` hook and that still uses that class's charge, fire
    and reset (a subclass that redefines them is not the neuron the hook describes)."""
    rec = registry.module_record(mod)
    if rec is None or "int" not in rec.hooks or not rec.modules:
        return False
    base = rec.modules[0]
    return all(getattr(type(mod), f) is getattr(base, f) for f in ("charge", "fire", "reset_membrane", "step"))


class _Quantizer:
    def __init__(self, gm, weight_bits, state_bits, leak, per_channel, input_bits, input_range, frac_bits):
        self.gm, self.T = gm, graph_spec(gm)["T"]
        self.weight_bits, self.state_bits, self.leak = weight_bits, state_bits, leak
        self.per_channel, self.frac_bits = per_channel, frac_bits
        self.input_q = 2 ** (input_bits - 1) - 1
        self.input_scale = input_range / self.input_q
        self.values: dict[fx.Node, Value] = {}
        self.float_mods: dict[fx.Node, nn.Module] = {}  # quantized conv/linear -> its float layer
        self.finest: dict[fx.Node, float] = {}          # the smallest per-layer weight scale it allows
        self.counter = 0

    # -- helpers -----------------------------------------------------------------------------
    def replace(self, node, module):
        self.gm.add_submodule(node.target, module)

    def bypass(self, node):
        node.replace_all_uses_with(node.args[0])
        self.values[node] = self.values[node.args[0]]
        self.gm.graph.erase_node(node)

    def reaches_readout(self, node):
        """Whether ``node``'s value flows into a readout without passing a neuron."""
        stack, seen = list(node.users), set()
        while stack:
            n = stack.pop()
            if n in seen or n.op != "call_module":
                continue
            seen.add(n)
            mod = self.gm.get_submodule(n.target)
            if isinstance(mod, (Readout, IntReadout)):
                return True
            if not isinstance(mod, (Neuron, IntIF)):
                stack.extend(n.users)
        return False

    # -- layers ------------------------------------------------------------------------------
    def weighted(self, node, mod, scale=None):
        """Quantize a conv/linear (``scale``: a given per-layer weight scale, for residual adds)."""
        self.float_mods[node] = mod
        x = self.values[node.args[0]]
        w = mod.weight.detach().double()
        cin = w.shape[1]
        s_x = x.scale if x.scale.numel() == 1 else x.scale.reshape(1, cin, *([1] * (w.dim() - 2)))
        w = w * s_x
        qmax = 2 ** (self.weight_bits - 1) - 1
        reduce_dims = tuple(range(1, w.dim()))
        self.finest[node] = float(w.abs().max()) / qmax if w.numel() else 0.0
        if scale is not None:
            s_w = s_wv = torch.tensor(scale, dtype=torch.float64)
        elif self.per_channel and not self.reaches_readout(node):
            s_w = w.abs().amax(reduce_dims) / qmax
            s_w = torch.where(s_w > 0, s_w, torch.ones_like(s_w))
            s_wv = s_w.reshape(-1, *([1] * (w.dim() - 1)))
        else:
            amax = float(w.abs().max()) if w.numel() else 0.0
            s_w = torch.tensor(amax / qmax if amax > 0 else 1.0, dtype=torch.float64)
            s_wv = s_w
        wq = torch.round(w / s_wv).clamp(-qmax, qmax).long()
        bq = None if mod.bias is None else round_int(mod.bias.detach().double() / s_w, "the bias", node)
        flat = wq.flatten(1)
        hi = (torch.maximum(flat * x.hi, flat * x.lo)).sum(1)
        lo = (torch.minimum(flat * x.hi, flat * x.lo)).sum(1)
        if bq is not None:
            hi, lo = hi + bq, lo + bq
        why = (f"fan-in {flat.shape[1]} x |w| <= {int(wq.abs().max()) if wq.numel() else 0} "
               f"x input in [{x.lo}, {x.hi}]")
        if max(int(hi.max()), -int(lo.min())) > INT32_MAX:
            raise IntegerOverflowRisk(f"quantize_integer: {node_ref(node)}: the int32 accumulator can "
                                      f"reach [{int(lo.min())}, {int(hi.max())}] ({why})")
        self.values[node] = Value(s_w, int(lo.min()), int(hi.max()), why)
        return wq, bq

    def conv(self, node, mod, scale=None):
        if mod.groups != 1 or any(d != 1 for d in mod.dilation) or mod.padding_mode != "zeros" \
                or isinstance(mod.padding, str) or len(set(mod.padding)) != 1 or len(set(mod.stride)) != 1:
            raise UnsupportedOp(f"quantize_integer: {node_ref(node)}: int.conv2d supports groups=1, "
                                "dilation 1, zero padding and equal stride/padding per axis only")
        wq, bq = self.weighted(node, mod, scale)
        self.replace(node, IntConv2d(wq, bq, mod.stride[0], mod.padding[0], self.weight_bits))

    def linear(self, node, mod, scale=None):
        wq, bq = self.weighted(node, mod, scale)
        self.replace(node, IntLinear(wq, bq, self.weight_bits))

    def pool(self, node, mod):
        k, s = mod.kernel_size, mod.stride if mod.stride is not None else mod.kernel_size
        k = k if isinstance(k, int) else (k[0] if len(set(k)) == 1 else None)
        s = s if isinstance(s, int) else (s[0] if len(set(s)) == 1 else None)
        pad = mod.padding if isinstance(mod.padding, int) else max(mod.padding)
        bad = k is None or s is None or pad != 0 or mod.ceil_mode or getattr(mod, "dilation", 1) not in (1, (1, 1))
        if bad or getattr(mod, "divisor_override", None):
            raise UnsupportedOp(f"quantize_integer: {node_ref(node)}: integer pooling needs a square "
                                "kernel, equal strides, no padding, no ceil_mode/dilation/divisor_override")
        x = self.values[node.args[0]]
        if isinstance(mod, nn.AvgPool2d):
            self.values[node] = Value(x.scale / (k * k), x.lo * k * k, x.hi * k * k, x.why + f" x pool {k}x{k}")
            self.replace(node, IntSumPool2d(k, s))
        else:
            self.values[node] = x
            self.replace(node, IntMaxPool2d(k, s))

    def reshape(self, node):
        x = self.values[node.args[0]]
        src, dst = info(node.args[0]), info(node)
        if x.scale.numel() > 1:
            cd = channel_dim(node.args[0])
            if tuple(dst.shape[:cd]) != tuple(src.shape[:cd]) or dst.shape[cd] != math.prod(src.shape[cd:]):
                raise UnsupportedOp(f"quantize_integer: {node_ref(node)} reshapes a per-channel-scaled value "
                                    "other than by flattening its channel dims; use per_channel=False")
            x = dataclasses.replace(x, scale=x.scale.repeat_interleave(math.prod(src.shape[cd + 1:])))
        self.values[node] = x

    def _requantize(self, node, scale):
        mod = self.float_mods[node]
        (self.conv if isinstance(mod, nn.Conv2d) else self.linear)(node, mod, scale)

    def _align(self, node, a, b):
        """Integer multipliers ``(ka, kb)`` with ``a*ka + b*kb`` on one scale: a weighted layer
        that only feeds this add is requantized onto the other operand's scale (both such layers:
        onto the coarser of the two; the other operand a spike train: onto ``1/m`` for the largest
        integer m its weights allow), else the scales must be integer multiples of each other."""
        def adjustable(n):
            return n in self.float_mods and len(n.users) == 1
        for n in (a, b):
            if self.values[n].scale.numel() > 1 and not adjustable(n):
                raise UnsupportedOp(f"quantize_integer: {node_ref(node)} adds a per-channel-scaled value "
                                    f"({node_ref(n)}); use per_channel=False")
        sa, sb = (float(self.values[n].scale.max()) for n in (a, b))
        if adjustable(a) and adjustable(b):
            scale = max(sa, sb)
            self._requantize(a, scale)
            self._requantize(b, scale)
            return 1, 1
        for p, q, sq in ((a, b, sb), (b, a, sa)):
            if adjustable(p) and self.finest[p] > 0 and sq / self.finest[p] >= 1 - 1e-9:
                m = max(1, math.floor(sq / self.finest[p] + 1e-9))
                self._requantize(p, sq / m)
                return (1, m) if p is a else (m, 1)
        for ratio, ks in ((sa / sb, lambda k: (k, 1)), (sb / sa, lambda k: (1, k))):
            if ratio >= 1 and abs(ratio - round(ratio)) < 1e-9:
                return ks(round(ratio))
        raise UnsupportedOp(f"quantize_integer: {node_ref(node)} adds values on integer scales {sa:.6g} and "
                            f"{sb:.6g} ({op_name(self.gm, a)} and {op_name(self.gm, b)}) that no requantization "
                            "of a layer feeding only this add can align")

    def add(self, node):
        a, b = node.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node) and not node.kwargs):
            raise UnsupportedOp(f"quantize_integer: {node_ref(node)}: int.add needs two tensor operands")
        va, vb = self.values[a], self.values[b]
        same = va.scale.shape == vb.scale.shape and torch.allclose(va.scale, vb.scale, rtol=1e-12, atol=0)
        ka, kb = (1, 1) if same else self._align(node, a, b)
        va, vb = self.values[a], self.values[b]
        self.counter += 1
        name = f"int_add_{self.counter}"
        self.gm.add_submodule(name, IntAdd(ka, kb))
        with self.gm.graph.inserting_after(node):
            new = self.gm.graph.call_module(name, (a, b))
        node.replace_all_uses_with(new)
        self.gm.graph.erase_node(node)
        lo, hi = va.lo * ka + vb.lo * kb, va.hi * ka + vb.hi * kb
        if max(hi, -lo) > INT32_MAX:
            raise IntegerOverflowRisk(f"quantize_integer: {node_ref(node)}: the int32 sum can reach [{lo}, {hi}]")
        self.values[new] = Value(va.scale / ka, lo, hi, f"({va.why}) x {ka} + ({vb.why}) x {kb}")

    # -- neurons and readouts ----------------------------------------------------------------
    def _leak(self, node, decay):
        if self.leak == "shift":
            k = 0 if decay == 0 else round(-math.log2(1.0 - decay))
            if abs((1.0 - 2.0 ** -k) - decay) > 1e-9:
                raise UnsupportedOp(f"quantize_integer: {node_ref(node)}: decay={decay:.6g} is not 1 - 2**-k, "
                                    "so leak='shift' cannot express it exactly (tau must be a power of two); "
                                    "use leak='fixed'")
            return {"leak": "shift", "shift": k}
        return {"leak": "fixed", "decay_q": round(decay * 2 ** self.frac_bits), "frac_bits": self.frac_bits}

    def neuron(self, node, mod):
        if mod.step_mode != "m":
            raise SnncError(f"quantize_integer: {node_ref(node)} is a single-step neuron; run unroll_timesteps first")
        x = self.values[node.args[0]]
        decay, gain, v_leak = registry.module_record(mod).hooks["int"](mod)   # the neuron's linear charge
        if gain <= 0:
            raise UnsupportedOp(f"quantize_integer: {node_ref(node)}: input gain 0 (decay_input with decay=1)")
        s_m = scale_view(x.scale * gain, node)
        v_th = torch.as_tensor(mod.v_th.detach() if isinstance(mod.v_th, torch.Tensor) else mod.v_th,
                               dtype=torch.float64)
        if (v_th <= 0).any():
            raise UnsupportedOp(f"quantize_integer: {node_ref(node)}: v_th must be > 0 for an integer threshold")
        if mod.reset_mode not in ("subtract", "zero"):
            raise UnsupportedOp(f"quantize_integer: {node_ref(node)}: reset={mod.reset_mode!r} has no integer form "
                                "(the integer neurons reset by 'subtract' or to 'zero')")
        lo, hi = -(2 ** (self.state_bits - 1)), 2 ** (self.state_bits - 1) - 1
        th = round_int(v_th / s_m, "the threshold", node)
        if (th < 1).any():
            raise IntegerOverflowRisk(f"quantize_integer: {node_ref(node)}: the threshold rounds to 0 on the "
                                      "input's integer scale; use more weight_bits")
        const = {n: round_int(getattr(mod, n) / s_m, n, node, lo, hi)
                 for n in ("v_reset", "v_init")}
        vl = round_int(v_leak / s_m, "v_leak", node, lo, hi)
        below = int(th.max()) - (1 if mod.compare == ">=" else 0)
        peak = max(below, int(const["v_init"].max()), int(vl.max()),
                   int(const["v_reset"].max()) if mod.reset_mode == "zero" else below) + max(x.hi, 0)
        if peak > hi:
            need = peak.bit_length() + 1
            fix = next((f"state_bits={b}" for b in (24, 32) if b >= need), "fewer weight_bits or input_bits")
            raise IntegerOverflowRisk(
                f"quantize_integer: state_bits={self.state_bits} is too small for {node_ref(node)}: threshold "
                f"{int(th.max())} plus the worst-case input current {x.hi} ({x.why}) reaches {peak} > {hi} "
                f"({need} bits); use {fix}")
        kw = dict(v_th=th, v_reset=const["v_reset"], v_init=const["v_init"], state_bits=self.state_bits,
                  reset=mod.reset_mode, compare=mod.compare)
        new = IntIF(**kw) if decay == 1.0 and int(vl.abs().max()) == 0 else \
            IntLIF(v_leak=vl, **self._leak(node, decay), **kw)
        self.replace(node, new)
        self.values[node] = Value(torch.tensor(1.0, dtype=torch.float64), 0, 1, "spikes")

    def readout(self, node, mod):
        x = self.values[node.args[0]]
        if x.scale.numel() > 1 and not torch.allclose(x.scale, x.scale[0].expand_as(x.scale)):
            raise UnsupportedOp(f"quantize_integer: {node_ref(node)}: readout of a per-channel-scaled value")
        scale = x.scale.reshape(-1)[0] / self.T
        lo, hi = x.lo * self.T, x.hi * self.T
        if max(hi, -lo) > INT32_MAX:
            raise IntegerOverflowRisk(f"quantize_integer: {node_ref(node)}: the readout sum over T={self.T} "
                                      f"can reach [{lo}, {hi}], outside int32")
        self.values[node] = Value(scale, lo, hi, "readout")
        self.replace(node, IntReadout(mod.mode))

    # -- driver ------------------------------------------------------------------------------
    def unsupported(self, node):
        name = op_name(self.gm, node)
        hint = _HINTS.get(name, "")
        raise UnsupportedOp(f"quantize_integer: {node_ref(node)} ({name}) has no integer form"
                            + (f": {hint}" if hint else "") + f"; supported: {', '.join(SUPPORTED)}")

    def run(self):
        g = self.gm.graph
        for node in list(g.nodes):
            if node.op == "placeholder":
                if info(node).dtype.is_floating_point is False:
                    raise SnncError(f"quantize_integer: {node_ref(node)} is already {info(node).dtype}; "
                                    "expected the float graph input")
                q = self.input_q
                self.values[node] = Value(torch.tensor(self.input_scale, dtype=torch.float64), -q, q,
                                           f"int{self.input_q.bit_length() + 1} input")
                continue
            if node.op == "output":
                continue
            name = op_name(self.gm, node)
            mod = self.gm.get_submodule(node.target) if node.op == "call_module" else None
            if isinstance(mod, nn.Conv2d):
                self.conv(node, mod)
            elif isinstance(mod, nn.Linear):
                self.linear(node, mod)
            elif isinstance(mod, (nn.AvgPool2d, nn.MaxPool2d)):
                self.pool(node, mod)
            elif isinstance(mod, (nn.Dropout, nn.Identity)):
                self.bypass(node)
            elif isinstance(mod, (DirectEncoder, MergeTime, SplitTime)):
                self.values[node] = self.values[node.args[0]]
            elif mod is not None and _integer_neuron(mod):
                self.neuron(node, mod)
            elif isinstance(mod, Readout):
                self.readout(node, mod)
            elif name in ("nn.flatten", "flatten", "view", "reshape"):
                self.reshape(node)
            elif name == "add" and node.op == "call_function" and node.target in (operator.add, torch.add):
                self.add(node)
            else:
                self.unsupported(node)


def quantize_integer(gm: fx.GraphModule, weight_bits: int = 8, state_bits: int = 24, leak: str = "shift",
                     per_channel: bool = False, input_bits: int = 8, input_range: float = 1.0,
                     frac_bits: int = 12) -> fx.GraphModule:
    """Return the integer IR of the unrolled float SNN ``gm`` (see the module docstring).

    ``input_range``: the largest |x| of the float input (digits: 1.0); spikes fed as the input
    are exact with ``input_range = 2**(input_bits-1) - 1`` (scale 1).
    """
    if not isinstance(weight_bits, int) or not 2 <= weight_bits <= 8:
        raise SnncError(f"quantize_integer: weight_bits={weight_bits!r}: expected an int in 2..8 (int8 storage)")
    if state_bits not in (16, 24, 32):
        raise SnncError(f"quantize_integer: state_bits={state_bits!r}: expected 16, 24 or 32")
    if leak not in ("shift", "fixed"):
        raise SnncError(f"quantize_integer: leak={leak!r}: expected 'shift' or 'fixed'")
    if not isinstance(input_bits, int) or not 2 <= input_bits <= 8:
        raise SnncError(f"quantize_integer: input_bits={input_bits!r}: expected an int in 2..8")
    if not input_range > 0:
        raise SnncError(f"quantize_integer: input_range={input_range!r} must be > 0")
    if not isinstance(frac_bits, int) or not 1 <= frac_bits <= 24:
        raise SnncError(f"quantize_integer: frac_bits={frac_bits!r}: expected an int in 1..24")
    spec = graph_spec(gm)
    if not spec.get("T"):
        raise SnncError("quantize_integer: the graph is per-step; run snnc.passes.unroll_timesteps(gm, T) first")
    out = copy.deepcopy(gm)
    out.snnc_spec = copy.deepcopy(spec)
    annotate(out)
    q = _Quantizer(out, weight_bits, state_bits, leak, per_channel, input_bits, input_range, frac_bits)
    q.run()
    out.graph.eliminate_dead_code()
    out.recompile()
    out.delete_all_unused_submodules()
    out.snnc_spec["inputs"] = [(tuple(s), "int8") for s, _ in spec["inputs"]]
    result = next(n for n in out.graph.nodes if n.op == "output").args[0]
    out_scale = q.values[result].scale if isinstance(result, fx.Node) and result in q.values else None
    out.snnc_integer = {
        "input_scale": q.input_scale, "input_bits": input_bits, "weight_bits": weight_bits,
        "state_bits": state_bits, "leak": leak, "per_channel": per_channel,
        "output_scale": float(out_scale) if out_scale is not None and out_scale.numel() == 1 else None}
    # fx's GraphModule.__deepcopy__ keeps only these user attributes (passes deepcopy their input)
    out.meta.setdefault("_user_preserved_attributes", {})["snnc_integer"] = out.snnc_integer
    return annotate(out)
