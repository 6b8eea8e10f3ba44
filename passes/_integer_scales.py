"""Scales and host-side encoding shared by ``quantize_integer`` and its users: the integer
meaning of a value, rounding with range checks, and the float <-> int8/int32 edges of an
integer graph (input quantization, readout dequantization)."""
from __future__ import annotations

import dataclasses

import torch
from torch import fx

from snnc.errors import SnncError, node_ref
from snnc.ir import info
from snnc.ops.integer import INT32_MAX


class IntegerOverflowRisk(SnncError):
    """A setting (state_bits, weight_bits, T) lets a worst-case input overflow an integer value."""


@dataclasses.dataclass
class Value:
    """What the integer value of a node means: real ~= int * scale (scale [] or [C] over the
    channel dim), integer range [lo, hi] over all inputs, and why (for error messages)."""

    scale: torch.Tensor
    lo: int
    hi: int
    why: str


def channel_dim(node):
    return 2 if info(node).layout == "seq" else 1


def scale_view(scale, node):
    """``scale`` shaped to broadcast against one sample ``[C, ...]`` of ``node``'s value."""
    if scale.numel() == 1:
        return scale.reshape(())
    rest = len(info(node).shape) - channel_dim(node) - 1
    return scale.reshape(-1, *([1] * rest))


def round_int(x, what, node, lo=-INT32_MAX, hi=INT32_MAX):
    q = torch.round(torch.as_tensor(x, dtype=torch.float64))
    if q.numel() and (q.min() < lo or q.max() > hi):
        raise IntegerOverflowRisk(f"quantize_integer: {node_ref(node)}: {what} quantizes to "
                                  f"[{int(q.min())}, {int(q.max())}], outside [{lo}, {hi}]")
    return q.long()


def quantize_input(gm: fx.GraphModule, x: torch.Tensor) -> torch.Tensor:
    """The int8 graph input for float ``x``: ``clamp(round(x / input_scale), -Q, Q)`` (torch.round:
    half to even). Host-side encoding, done before the integer graph runs."""
    meta = _integer_meta(gm)
    q = 2 ** (meta["input_bits"] - 1) - 1
    return torch.round(x.double() / meta["input_scale"]).clamp(-q, q).to(torch.int8)


def dequantize_output(gm: fx.GraphModule, y: torch.Tensor) -> torch.Tensor:
    """The float readout the integer sum stands for: ``y * output_scale`` (float64)."""
    meta = _integer_meta(gm)
    if meta["output_scale"] is None:
        raise SnncError("dequantize_output: the graph's output has no single integer scale")
    return y.double() * meta["output_scale"]


def _integer_meta(gm):
    meta = getattr(gm, "snnc_integer", None)
    if meta is None:
        raise SnncError("graph is not an integer IR (no gm.snnc_integer): run quantize_integer first")
    return meta
