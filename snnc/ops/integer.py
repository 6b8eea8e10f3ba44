"""Integer ops: the neuromorphic-style integer IR that ``quantize_integer`` produces.

Their ``forward`` IS the integer reference interpreter: every value is an integer tensor, every
step below is exact integer arithmetic (torch int64 inside, int8/int32 at the op boundaries), and
the tvm:int target must reproduce it bit for bit. Conventions shared by all ops:

* values: the graph input is int8 (see ``passes/quantize_integer.py`` for how floats map to it),
  spikes are int8 0/1, synaptic currents and readouts are int32.
* ``a >> k`` is the arithmetic right shift, i.e. ``floor(a / 2**k)`` (rounds towards -inf, also
  for negative ``a``), as in C on two's-complement machines and in TVM's ``shift_right``.
* ``sat_B(z) = min(max(z, -2**(B-1)), 2**(B-1) - 1)`` saturates to a B-bit signed range.
* an integer accumulator that would leave int32 raises ``IntegerOverflowError`` in the reference
  (the quantize pass checks worst-case bounds statically, so this only fires on a hand-edited IR).
Layouts are the unrolled ones: neurons and readouts take ``[T, N, ...]``; conv/linear/pool run on
``[T*N, ...]`` or on the static ``[N, ...]`` before a hoisted encoder.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from snnc.errors import SnncError

from .registry import register_op, seq_when_multi_step

INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


class IntegerOverflowError(SnncError):
    """An integer value left the range its op promises (int32 accumulator, B-bit membrane)."""


def _to_int32(acc: torch.Tensor, op: str) -> torch.Tensor:
    if acc.numel() and (int(acc.min()) < INT32_MIN or int(acc.max()) > INT32_MAX):
        raise IntegerOverflowError(f"{op}: int32 accumulator overflow (range [{int(acc.min())}, "
                                   f"{int(acc.max())}]); the quantize_integer bounds were bypassed")
    return acc.to(torch.int32)


def _set_int(module: nn.Module, name: str, value) -> None:
    """An integer constant: a plain int when all its elements are equal, else an int32 buffer
    (per channel)."""
    t = torch.as_tensor(value)
    if t.numel() == 1 or bool((t == t.reshape(-1)[0]).all()):
        setattr(module, name, int(t.reshape(-1)[0]))
    else:
        module.register_buffer(name, t.to(torch.int32).clone())


def _require_int(x: torch.Tensor, op: str) -> None:
    """Refuse float input: ``.long()`` would truncate it to garbage without a word (10% accuracy
    on digits where the host-quantized input gives 98%)."""
    if x.is_floating_point():
        from ..errors import InputError
        raise InputError(f"{op}: got a {str(x.dtype).replace('torch.', '')} input; the integer graph takes int8: "
                         "quantize it with snnc.passes.quantize_integer.quantize_input(graph, x), or run the graph "
                         "with snnc.run / snnc.compile(graph, 'tvm:int'), which quantize float input the same way")


def _long(v) -> torch.Tensor:
    return torch.as_tensor(v).long()


def _is_zero(v) -> bool:
    return isinstance(v, int) and v == 0


class IntConv2d(nn.Module):
    """``y[n,o,i,j] = b[o] + sum_{c,u,v} W[o,c,u,v] * xpad[n,c,i*s+u,j*s+v]`` exactly, as int32.

    ``W`` int8-valued (``bits`` wide, symmetric: ``|W| <= 2**(bits-1) - 1``) stored as int8,
    ``b`` int32, ``xpad`` the input zero-padded by ``pad``. Input int8 or int32."""

    op_name = "int.conv2d"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, stride=1, padding=0, bits=8):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("bias", None if bias is None else bias.to(torch.int32))
        self.stride, self.padding, self.bits = int(stride), int(padding), int(bits)

    def forward(self, x):
        _require_int(x, self.op_name)
        acc = F.conv2d(x.long(), self.weight.long(), None if self.bias is None else self.bias.long(),
                       stride=self.stride, padding=self.padding)
        return _to_int32(acc, self.op_name)

    def attrs(self):
        w = self.weight
        return {"out": w.shape[0], "kernel": w.shape[2] if w.shape[2] == w.shape[3] else f"{w.shape[2]}x{w.shape[3]}",
                "stride": self.stride, "pad": self.padding, "bits": self.bits}


class IntLinear(nn.Module):
    """``y[n,o] = b[o] + sum_i W[o,i] * x[n,i]`` exactly, as int32 (``W`` as in ``IntConv2d``)."""

    op_name = "int.linear"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, bits=8):
        super().__init__()
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("bias", None if bias is None else bias.to(torch.int32))
        self.bits = int(bits)

    def forward(self, x):
        _require_int(x, self.op_name)
        acc = x.long() @ self.weight.long().T
        if self.bias is not None:
            acc = acc + self.bias.long()
        return _to_int32(acc, self.op_name)

    def attrs(self):
        return {"out": self.weight.shape[0], "bits": self.bits}


def _windows(x, k, s):
    """The k*k strided views ``x[..., i*s+u, j*s+v]`` of a pooling window (no padding)."""
    h, w = (x.shape[-2] - k) // s + 1, (x.shape[-1] - k) // s + 1
    return [x[..., u:u + s * (h - 1) + 1:s, v:v + s * (w - 1) + 1:s] for u in range(k) for v in range(k)]


class IntSumPool2d(nn.Module):
    """``y[n,c,i,j] = sum_{u,v < k} x[n,c,i*s+u,j*s+v]`` as int32 (no padding): average pooling
    with the ``1/k**2`` moved into the next layer's scale, so no division happens here."""

    op_name = "int.sum_pool2d"

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = int(kernel), int(stride)

    def forward(self, x):
        _require_int(x, self.op_name)
        return _to_int32(torch.stack(_windows(x.long(), self.kernel, self.stride)).sum(0), self.op_name)

    def attrs(self):
        return {"kernel": self.kernel, "stride": self.stride}


class IntMaxPool2d(nn.Module):
    """``y[n,c,i,j] = max_{u,v < k} x[n,c,i*s+u,j*s+v]`` (no padding); keeps the input dtype."""

    op_name = "int.max_pool2d"
    spiking_output = "keep"

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = int(kernel), int(stride)

    def forward(self, x):
        _require_int(x, self.op_name)
        return torch.stack(_windows(x, self.kernel, self.stride)).amax(0)

    def attrs(self):
        return {"kernel": self.kernel, "stride": self.stride}


class IntAdd(nn.Module):
    """``y = a * mul_a + b * mul_b`` as int32: a residual add with the operands' scales aligned by
    small positive integer multipliers (``quantize_integer`` picks them)."""

    op_name = "int.add"

    def __init__(self, mul_a: int = 1, mul_b: int = 1):
        super().__init__()
        self.mul_a, self.mul_b = int(mul_a), int(mul_b)

    def forward(self, a, b):
        _require_int(a, self.op_name)
        _require_int(b, self.op_name)
        return _to_int32(a.long() * self.mul_a + b.long() * self.mul_b, self.op_name)

    def attrs(self):
        return {k: v for k, v in (("mul_a", self.mul_a), ("mul_b", self.mul_b)) if v != 1}


class IntIF(nn.Module):
    """Integer integrate-and-fire over ``[T, N, ...]`` with a ``state_bits``-wide membrane.

        V[-1] = v_init
        H[t]  = sat_B(V[t-1] + X[t])                       (IF: no leak)
        S[t]  = 1 if H[t] >= v_th else 0                   (compare=">": H[t] > v_th)
        V[t]  = H[t] - v_th * S[t]                         (reset="subtract")
        V[t]  = v_reset if S[t] else H[t]                  (reset="zero")

    ``v_th``, ``v_reset``, ``v_init`` are ints, or int32 buffers broadcastable to one sample
    (``[C, 1, 1]`` / ``[C]``) when per channel. The pass guarantees ``1 <= v_th`` and that all of them
    lie in the B-bit range, so ``V`` never leaves it (saturation happens only in ``H``).
    Spikes are int8 0/1.
    """

    op_name = "int.if"
    spiking_output = "yes"
    step_mode = "m"  # always multi-step: [T, N, ...] in, [T, N, ...] spikes out

    def __init__(self, v_th, v_reset=0, v_init=0, state_bits=16, reset="subtract", compare=">="):
        super().__init__()
        for name, v in (("v_th", v_th), ("v_reset", v_reset), ("v_init", v_init)):
            _set_int(self, name, v)
        self.state_bits = int(state_bits)
        if reset not in ("subtract", "zero"):
            raise ValueError(f"{type(self).__name__}: reset={reset!r}: expected 'subtract' or 'zero'")
        self.reset_mode, self.compare = reset, compare

    @property
    def state_range(self):
        return -(2 ** (self.state_bits - 1)), 2 ** (self.state_bits - 1) - 1

    def leak(self, v):
        """The membrane after one step of leak, before the input is added (int64)."""
        return v

    def forward(self, x_seq):
        _require_int(x_seq, self.op_name)
        lo, hi = self.state_range
        th, vr = _long(self.v_th), _long(self.v_reset)
        v = _long(self.v_init).expand(x_seq.shape[1:])
        out = []
        for t in range(x_seq.shape[0]):
            h = (self.leak(v) + x_seq[t].long()).clamp(lo, hi)
            s = h >= th if self.compare == ">=" else h > th
            v = h - th * s if self.reset_mode == "subtract" else torch.where(s, vr, h)
            out.append(s.to(torch.int8))
        return torch.stack(out)

    def attrs(self):
        a = {"v_th": self.v_th}
        if self.reset_mode == "zero":
            a["v_reset"] = self.v_reset
        a["reset"] = self.reset_mode
        if self.compare != ">=":
            a["compare"] = self.compare
        if not _is_zero(self.v_init):
            a["v_init"] = self.v_init
        a["state_bits"] = self.state_bits
        return a


class IntLIF(IntIF):
    """Integer leaky integrate-and-fire: ``IntIF`` with the leak applied towards ``v_leak``:

        D     = V[t-1] - v_leak
        leak="shift":  L = D - (D >> shift)                 (decay = 1 - 2**-shift)
        leak="fixed":  L = (D * decay_q + 2**(frac_bits-1)) >> frac_bits
                                                            (decay = decay_q / 2**frac_bits,
                                                             round half up)
        H[t]  = sat_B(v_leak + L + X[t])

    then fire and reset as in ``IntIF``. ``D * decay_q`` is formed in int64 (B + frac_bits + 1
    bits at most). ``v_leak`` is an int32 buffer like ``v_th``.
    """

    op_name = "int.lif"

    def __init__(self, v_th, leak="shift", shift=None, decay_q=None, frac_bits=None, v_leak=0, **kw):
        super().__init__(v_th, **kw)
        if leak not in ("shift", "fixed"):
            raise ValueError(f"IntLIF leak={leak!r}: expected 'shift' or 'fixed'")
        if (leak == "shift") != (shift is not None) or (leak == "fixed") != (decay_q is not None and frac_bits is not None):
            raise ValueError("IntLIF: leak='shift' needs shift=, leak='fixed' needs decay_q= and frac_bits=")
        self.leak_mode = leak
        self.shift = None if shift is None else int(shift)
        self.decay_q = None if decay_q is None else int(decay_q)
        self.frac_bits = None if frac_bits is None else int(frac_bits)
        _set_int(self, "v_leak", v_leak)

    def leak(self, v):
        vl = _long(self.v_leak)
        d = v - vl
        if self.leak_mode == "shift":
            return vl + d - (d >> self.shift)
        return vl + ((d * self.decay_q + (1 << (self.frac_bits - 1))) >> self.frac_bits)

    def attrs(self):
        a = {"leak": self.leak_mode}
        if self.leak_mode == "shift":
            a["shift"] = self.shift
        else:
            a["decay_q"], a["frac_bits"] = self.decay_q, self.frac_bits
        if not _is_zero(self.v_leak):
            a["v_leak"] = self.v_leak
        a.update(super().attrs())
        return a


class IntReadout(nn.Module):
    """``y[n, ...] = sum_t X[t, n, ...]`` as int32: the integer form of ``snn.readout``.

    The float readout's mean over T is ``y * scale / T`` with the graph's output scale
    (``gm.snnc_integer["output_scale"]``); the division is left out so no rounding happens and
    argmax is unchanged. ``mode`` says whether X are spikes or currents (as in ``Readout``)."""

    op_name = "int.readout"
    output_layout = "step"
    step_mode = "m"

    def __init__(self, mode="membrane"):
        super().__init__()
        self.mode = mode

    def forward(self, x_seq):
        _require_int(x_seq, self.op_name)
        return _to_int32(x_seq.long().sum(0), self.op_name)

    def attrs(self):
        return {"mode": self.mode, "reduce": "sum"}


INTEGER_OPS = (IntConv2d, IntLinear, IntSumPool2d, IntMaxPool2d, IntAdd, IntIF, IntLIF, IntReadout)


# --- op records: the integer IR runs in torch (reference) and on tvm:int --------------------------
_INT = "snnc.targets.tvm_int_lower:"
_NO_ONNX = {"onnx": "the integer IR runs on tvm:int or torch; ONNX has no saturating integer neuron arithmetic"}
for _cls, _emit, _kw in [
        (IntConv2d, "_emit_conv2d", {}), (IntLinear, "_emit_linear", {}), (IntSumPool2d, "_emit_pool", {}),
        (IntMaxPool2d, "_emit_pool", {}), (IntAdd, "_emit_add", {}),
        (IntIF, "_emit_neuron", {"state": ("v",), "accepts": seq_when_multi_step}),
        (IntLIF, "_emit_neuron", {"state": ("v",), "accepts": seq_when_multi_step}),
        (IntReadout, "_emit_readout", {"accepts": seq_when_multi_step, "layout": lambda m, ls: "step"})]:
    register_op(_cls, hooks={"tvm:int": _INT + _emit}, refused=_NO_ONNX, **_kw)
