"""Spike-aware Conv2d / Linear for the CPU: a layer whose input is a 0/1 spike tensor runs as an
int8 x uint8 -> int32 oneDNN kernel (AMX-INT8 / AVX512-VNNI) with fp32 output, close to fp32.

Why: 0 and 1 are exact in uint8, so the only approximation is in the weights. Each output
channel's weights are split into ``parts`` int8 digits, w ~ s*q0 + (s/254)*q1 + (s/254^2)*q2 ...
with s = max|w_c| / 127 (each residual is at most half a step, so the next digit fits in
[-127, 127]). oneDNN accumulates every digit's products in int32 (exact) and scales each to fp32
once; the digits are extra output channels of one convolution, summed in fp32 afterwards.
Error bound, per output channel c, for any 0/1 input:

    |y_int8 - y_exact| <= k_c * s_c / (2 * 254^(parts-1)) + fp32 rounding of the (parts+1)-term sum

where k_c = in_channels/groups * kh * kw (Linear: in_features) is the number of inputs that can be
active (``SpikeConv2d.error_bound``). With parts=2 that is k * max|w_c| * 1.55e-5 in the worst case
(every input active, every rounding error the same sign); typical errors are ~sqrt(k) smaller.
On the AMX host this measured 3-6x faster than fp32 oneDNN on 128-channel 3x3 convs.

``stacked_int8`` / ``stack_spikes`` are the same two digits as one conv over ``2*C_in`` input
channels (spikes stacked as ``[254*s | s]``): C_out outputs and no digit sum; the fused blocks
(``spike_block``) and the training convs (``snnc.ops.train_conv``) use that form.

Only layers whose input is proven binary use it (``binary_input``: the producer is an IF / LIF /
PLIF neuron, possibly through layout-only ops); the choice against fp32 is made per layer by
timing (``race`` in tvm_hybrid). Outputs are channels_last: the neuron kernels that follow are
elementwise and keep that layout, so the next spike layer needs no transpose.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

from snnc.ops import IF, LIF, ParametricLIF
from snnc.ops.coding import MergeTime, SplitTime

INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")  # best first: oneDNN picks the kernel itself
_BINARY_NEURONS = (IF, LIF, ParametricLIF)  # S = Θ(H - v_th) in {0, 1}; DSR subclasses scale it
_LAYOUT_ONLY = (MergeTime, SplitTime, nn.Flatten, nn.Identity, nn.MaxPool2d, nn.Dropout)
_LAYOUT_CALLS = (torch.flatten, F.max_pool2d)
_LAYOUT_METHODS = ("view", "reshape", "flatten", "contiguous")
HI = 254  # the high digit's input multiplier: 254*1 fits uint8, and q1 spans [-127, 127] of s/254


def int8_isa() -> str | None:
    """The best int8 matrix instruction set of this CPU (``amx_int8``, ``avx512_vnni``,
    ``avx_vnni``), or None: without one the int8 path is not faster and is never chosen."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return next((f for f in INT8_FLAGS if f in flags), None)


def binary_input(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether the first input of ``node`` is always 0/1: produced by an IF/LIF/PLIF neuron
    (exact types; a DSR neuron emits v_th-scaled spikes) through layout-only ops."""
    arg = node.args[0] if node.args else None
    while isinstance(arg, fx.Node):
        if arg.op == "call_module":
            mod = gm.get_submodule(arg.target)
            if type(mod) in _BINARY_NEURONS:
                return True
            if type(mod) in _LAYOUT_ONLY and not (isinstance(mod, nn.Dropout) and mod.training):
                arg = arg.args[0]
                continue
        elif (arg.op == "call_function" and arg.target in _LAYOUT_CALLS) or \
                (arg.op == "call_method" and arg.target in _LAYOUT_METHODS):
            arg = arg.args[0]
            continue
        return False
    return False


def split_int8(w: torch.Tensor, parts: int = 2):
    """``(digits, scales, last_scale)``: int8 digits ``[parts*O, ...]`` (digit p of channel c at
    row p*O + c) and fp32 scales ``[parts*O]`` with w[c] ~ sum_p scales[p*O+c] * digits[p*O+c];
    ``last_scale[c]`` = the smallest digit's scale (error per weight <= last_scale / 2)."""
    if not 1 <= parts <= 4:
        raise ValueError(f"parts={parts}: expected 1 to 4 int8 digits")
    r = w.detach().double()
    view = (-1,) + (1,) * (w.dim() - 1)
    s = r.abs().flatten(1).amax(1) / 127
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero channel: any scale, digits 0
    digits, scales = [], []
    for _ in range(parts):
        s = s.float().double()  # the kernel scales by fp32: later digits absorb that rounding too
        q = torch.round(r / s.view(view)).clamp(-127, 127)
        digits.append(q.to(torch.int8))
        scales.append(s.clone())
        r = r - q * s.view(view)
        s = s / 254  # |residual| <= s/2 = 127 * (s/254)
    return torch.cat(digits), torch.cat(scales).float(), scales[-1].float()


def stacked_int8(w: torch.Tensor):
    """``(digits [O, 2*I, ...] int8, scale [O] fp32, step [O] fp32)``: w[c] ~ scale[c] *
    (254*digits[c, :I] + digits[c, I:]) with every weight within ``step[c] / 2`` (= scale / 2) of
    its exact value: Q = round(w / s), s = max|w_c| / (127*254), written in base 254."""
    r = w.detach().double()
    view = (-1,) + (1,) * (w.dim() - 1)
    top = HI * 127
    s = (r.abs().flatten(1).amax(1) / top).float()
    s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero channel: any scale, digits 0
    q = torch.round(r / s.double().view(view)).clamp(-top, top)
    hi = torch.round(q / HI)
    lo = q - HI * hi  # in [-127, 127]: |q - 254*round(q/254)| <= 127
    return torch.cat([hi, lo], 1).to(torch.int8), s, s


def stack_spikes(x: torch.Tensor) -> torch.Tensor:
    """fp32 0/1 spikes ``[..., C, H, W]`` -> uint8 ``[..., 2C, H, W]`` channels_last ``[254*x | x]``:
    the input of an int8 block whose producer is not a block."""
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:])
    out = torch.empty(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=torch.uint8,
                      memory_format=torch.channels_last)
    out[:, x.shape[1]:] = x
    torch.mul(out[:, x.shape[1]:], HI, out=out[:, :x.shape[1]])
    return out.reshape(*lead, *out.shape[1:]) if lead else out


class _SpikeLayer(nn.Module):
    """Shared parts of the int8 spike layers: weight digits, bound, the fp32 sum of the digits."""

    def __init__(self, layer, parts, fan_in):
        super().__init__()
        self.layer, self.parts, self.out_ch = layer, int(parts), layer.weight.shape[0]
        self.digits, self.scales, last = split_int8(layer.weight, self.parts)
        self.zero_points = torch.zeros(self.scales.numel(), dtype=torch.int64)
        self.register_buffer("error_bound", fan_in * last / 2, persistent=False)
        # the bias rides with digit 0 inside the kernel (zeros for the other digits)
        self.bias = None if layer.bias is None else torch.cat(
            [layer.bias.detach().float(), torch.zeros((self.parts - 1) * self.out_ch)])

    def _sum_digits(self, y, dim, out=None):
        if self.parts == 1:
            return y if out is None else out.copy_(y)
        digit = [y.narrow(dim, p * self.out_ch, self.out_ch) for p in range(self.parts)]
        out = torch.add(digit[0], digit[1], out=out)
        for d in digit[2:]:
            out.add_(d)
        return out


class SpikeConv2d(_SpikeLayer):
    """``conv`` (an ``nn.Conv2d`` with zero padding) on a 0/1 input as an int8 oneDNN conv with
    fp32 output; see the module docstring for the bound. Returns a channels_last tensor."""

    def __init__(self, conv: nn.Conv2d, in_shape, parts: int = 2):
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.groups != 1:
            # grouped: the digit channels would land in other groups (oneDNN splits O by group)
            raise ValueError("SpikeConv2d: only ungrouped convs with zero padding given as numbers")
        super().__init__(conv, parts, conv.weight[0].numel())
        self.geometry = (list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)
        stride, padding, dilation, groups = self.geometry
        self.packed = torch.ops.onednn.qconv_prepack(self.digits, self.scales, 1.0, 0, stride, padding,
                                                     dilation, groups, list(in_shape))

    def forward(self, x, out=None):
        """``out``: an optional channels_last fp32 buffer of the output shape to write into."""
        xu = x.to(torch.uint8, memory_format=torch.channels_last)
        stride, padding, dilation, groups = self.geometry
        y = torch.ops.onednn.qconv2d_pointwise(xu, 1.0, 0, self.packed, self.scales, self.zero_points, self.bias,
                                               stride, padding, dilation, groups, 1.0, 0, torch.float32,
                                               "none", [], "")
        return self._sum_digits(y, 1, out)


class SpikeLinear(_SpikeLayer):
    """``linear`` on a 0/1 input as an int8 oneDNN matmul with fp32 output (module docstring)."""

    def __init__(self, linear: nn.Linear, parts: int = 2):
        super().__init__(linear, parts, linear.in_features)
        self.packed = torch.ops.onednn.qlinear_prepack(self.digits, None)

    def forward(self, x):
        lead = x.shape[:-1]
        xu = x.reshape(-1, x.shape[-1]).to(torch.uint8)
        y = torch.ops.onednn.qlinear_pointwise(xu, 1.0, 0, self.packed, self.scales, self.zero_points, self.bias,
                                               1.0, 0, torch.float32, "none", [], "")
        return self._sum_digits(y, 1).reshape(*lead, self.out_ch)
