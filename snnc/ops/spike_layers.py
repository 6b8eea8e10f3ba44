"""Convolution and linear layers whose input is a spike tensor: the weight gradient from uint8.

``dW = Σ grad_out ⊗ spikes`` reads the layer's input; a float32 copy of the whole spike input
in backward is the largest transient of a training step (the layer's input, grad_output and
grad_input at once). The 0/1 spikes are exact in uint8 (``spike_store``), so the backward here
converts them to float32 in chunks of rows (``CHUNK_BYTES`` of float32 at a time) and
accumulates ``dW`` over the chunks in float32: the same products, summed in a different order
(within float32 rounding of the unchunked sum; tested against float64). ``grad_input`` is
computed chunk by chunk in the same calls (rows are independent: exact).

``spike_store.compact_spikes`` installs ``spike_input_hook`` on a graph's Conv/Linear modules:
when a call's input is a registered spike tensor and autograd is on, the output (computed by the
module as usual, bit-identical) is re-attached to ``_SpikeInput``, whose saved state is the
uint8 spikes and the weight; the module's own autograd node, and what it saved, are dropped.
"""
from __future__ import annotations

import torch
from torch import nn

CHUNK_BYTES = 16 << 20
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _conv_args(m):
    return list(m.stride), list(m.padding), list(m.dilation), m.groups


def conv_backward(grad_out, s8, weight, geometry, need_in, need_w, need_b, whole_bytes=0):
    """``(dL/dx, dL/dW, dL/db)`` of a convolution whose input was the 0/1 tensor ``s8`` (uint8, or
    a float input), converted to float32 a chunk of rows at a time (``CHUNK_BYTES``); rows are
    independent, so dL/dx is exact and dL/dW is the same products summed chunk by chunk. An input
    of at most ``whole_bytes`` as float32 is one call (no copy of dL/dx into place, no dL/dW sum:
    measured 0.85x the time of two chunks on a 64x128x32x32 input). The gradients keep ``s8``'s /
    ``weight``'s memory layout (channels_last stays channels_last)."""
    stride, padding, dilation, groups = geometry
    zeros = [0] * len(stride)

    def call(lo, hi, bias=False):   # bias: dL/db from the same oneDNN pass over dL/dy
        # dL/dx alone reads only the input's shape: an expanded placeholder, as torch.nn.grad's
        # conv2d_input passes (no float32 copy of the spikes; same bits, tested)
        inp = s8[lo:hi].to(torch.float32) if need_w or bias else grad_out.new_empty(1).expand(s8[lo:hi].shape)
        return torch.ops.aten.convolution_backward(
            grad_out[lo:hi], inp, weight, [weight.shape[0]] if bias else None,
            stride, padding, dilation, False, zeros, groups, [need_in, need_w, bias])
    if 4 * s8.numel() <= whole_bytes:
        return call(0, s8.shape[0], need_b)
    gb = grad_out.sum(dim=[0] + list(range(2, grad_out.dim()))) if need_b else None
    # row chunks for both gradients: oneDNN's layout copies of grad_out / grad_input are
    # then chunk-sized too, not the size of the whole layer
    rows = max(1, CHUNK_BYTES // (4 * max(1, s8[0].numel())))
    gi = torch.empty_like(s8, dtype=grad_out.dtype) if need_in else None
    gw = torch.zeros_like(weight) if need_w else None
    for lo in range(0, s8.shape[0], rows):
        part = call(lo, lo + rows)
        if need_in:
            gi[lo:lo + rows] = part[0]
        if need_w:
            gw += part[1]
    return gi, gw, gb


class _SpikeInput(torch.autograd.Function):
    """Identity on the module's ``out``; backward of ``module`` on the input ``spikes``, from the
    uint8 copy ``spikes_u8``."""

    @staticmethod
    def forward(ctx, out, spikes, spikes_u8, module, weight, bias):
        ctx.module, ctx.has_bias, ctx.in_shape = module, bias is not None, spikes.shape
        ctx.save_for_backward(spikes_u8, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        s8, weight = ctx.saved_tensors
        m, (_, need_in, _, _, need_w, need_b) = ctx.module, ctx.needs_input_grad
        need_b = need_b and ctx.has_bias
        grad_out = grad_out.contiguous()
        gi = gw = gb = None
        if isinstance(m, _CONVS):
            gi, gw, gb = conv_backward(grad_out, s8, weight, _conv_args(m), need_in, need_w, need_b)
        else:
            g2, s2 = grad_out.reshape(-1, grad_out.shape[-1]), s8.reshape(-1, s8.shape[-1])
            if need_in:
                gi = (g2 @ weight).reshape(ctx.in_shape)
            if need_w:
                gw = torch.zeros_like(weight)
                rows = max(1, CHUNK_BYTES // (4 * max(1, s2.shape[1])))
                for lo in range(0, s2.shape[0], rows):
                    gw.addmm_(g2[lo:lo + rows].t(), s2[lo:lo + rows].to(torch.float32))
            if need_b:
                gb = g2.sum(0)
        return None, gi, None, None, gw, gb


def spike_input_hook(module, args, output):
    """Forward hook: re-attach ``output`` to the uint8-reading backward when the input is spikes."""
    from .spike_store import lookup
    if not (torch.is_grad_enabled() and len(args) == 1 and isinstance(output, torch.Tensor)
            and output.requires_grad and output.dtype == torch.float32):
        return None
    if (type(module) not in (*_CONVS, nn.Linear) or getattr(module, "padding_mode", "zeros") != "zeros"
            or isinstance(getattr(module, "padding", None), str)):   # padding="same": torch's own path
        return None
    from .train_conv import produced_here
    s8 = lookup(args[0])
    if s8 is None or produced_here(output) or module.weight.dtype != torch.float32:
        return None
    # the module's own autograd node (and the input it saved) goes with the old ``output``
    return _SpikeInput.apply(output.detach(), args[0], s8, module, module.weight, module.bias)
