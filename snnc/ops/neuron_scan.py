"""Fused multi-step neuron scan for training: one autograd node for the whole T loop.

The step loop of ``Neuron.multi_step`` records ~7 autograd nodes per step and saves their
inputs; on CPU that bookkeeping, not the arithmetic, dominates a neuron layer's training step.
``neuron_scan`` runs the same forward (bit-identical spikes: same float ops in the same order)
without autograd, stores only ``z[t] = H[t] - v_th`` (one tensor ``[T, N, ...]``), and computes
backpropagation through time by hand (Wu 2019 STBP, eqs. 4-7, for the update below):

    H[t] = decay * V[t-1] + gain * X[t] (+ leak terms without gradient)
    S[t] = Θ(z[t]),  z[t] = H[t] - v_th,   Θ' := g(z)  (the surrogate)
    V[t] = H[t] - v_th * S[t]              (subtract)  |  H[t] * (1 - S[t]) + v_reset * S[t]  (zero)

    dL/dH[t] = dL/dS[t] * g[t] + b[t] * dL/dH[t+1]
    b[t]     = decay * (1 - v_th * g[t])                           (subtract)
             = decay * ((1 - S[t]) + (v_reset - H[t]) * g[t])      (zero)
    dL/dX[t] = gain * dL/dH[t]

The gradient equals autograd's through the step loop up to float rounding (tested). It applies
to ``IF`` and ``LIF`` with a fixed threshold; any other neuron (ParametricLIF, a trainable
``v_th``, subclasses with their own charge) runs the step loop.
"""
from __future__ import annotations

import torch

from .neurons import IF, LIF


def step_loop(neuron, x_seq):
    """The reference multi-step loop: T calls of ``neuron.step`` under autograd."""
    v = neuron.initial_membrane(x_seq[0])
    out = []
    for t in range(x_seq.shape[0]):
        s, v = neuron.step(x_seq[t], v)
        out.append(s)
    return torch.stack(out)


def linear_charge(neuron):
    """``(decay, gain)`` when ``H = decay * V + gain * X (+ const)``, else ``None``."""
    charge = type(neuron).charge
    if charge is IF.charge:
        return 1.0, 1.0
    if charge is LIF.charge:
        return neuron.decay, neuron.gain
    return None


def fusable(neuron) -> bool:
    v_th = neuron.v_th
    return linear_charge(neuron) is not None and not (isinstance(v_th, torch.Tensor) and v_th.requires_grad) \
        and neuron.reset_mode in ("subtract", "zero")  # "subtract_after_leak" (snntorch) runs step_loop


def _charge(neuron, v, x, decay):
    # the same rounded ops as IF.charge / LIF.charge, in the same order (bit-identical forward);
    # v_leak and decay_input keep the neuron's own expression
    if type(neuron).charge is IF.charge:
        return v + x
    if neuron.v_leak != 0.0 or neuron.decay_input:
        return neuron.charge(v, x)
    return torch.mul(v, decay).add_(x)


class _NeuronScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_seq, neuron, surrogate):
        decay, gain = linear_charge(neuron)
        v_th = neuron.v_th
        strict = neuron.compare == ">"
        subtract = neuron.reset_mode == "subtract"
        z_seq = torch.empty_like(x_seq)
        out = torch.empty_like(x_seq)
        v = neuron.initial_membrane(x_seq[0])
        for t in range(x_seq.shape[0]):
            h = _charge(neuron, v, x_seq[t], decay)
            z = torch.sub(h, v_th, out=z_seq[t])
            fired = z > 0 if strict else z >= 0
            out[t].copy_(fired)
            # subtract: H - v_th*S is H - v_th (= z, same rounding) where S=1 and H - 0 = H where S=0;
            # zero: H*(1-S) + v_reset*S is v_reset where S=1 and H where S=0
            v = torch.where(fired, z, h) if subtract else torch.where(fired, neuron.v_reset, h)
        ctx.neuron, ctx.surrogate, ctx.decay, ctx.gain = neuron, surrogate, decay, gain
        ctx.save_for_backward(z_seq)
        return out

    @staticmethod
    def backward(ctx, grad_s):
        (z,) = ctx.saved_tensors
        neuron = ctx.neuron
        v_th = neuron.v_th.detach() if isinstance(neuron.v_th, torch.Tensor) else neuron.v_th
        g = ctx.surrogate.derivative(z, v_th)
        if neuron.reset_mode == "subtract":
            b = (1.0 - v_th * g).mul_(ctx.decay)
        else:
            fired = (z > 0) if neuron.compare == ">" else (z >= 0)
            b = (neuron.v_reset - (z + v_th)) * g
            b = b.add_((~fired).to(z.dtype)).mul_(ctx.decay)
        grad_h = grad_s * g
        for t in range(z.shape[0] - 2, -1, -1):
            grad_h[t].addcmul_(b[t], grad_h[t + 1])
        if ctx.gain != 1.0:
            grad_h.mul_(ctx.gain)
        return grad_h, None, None


def neuron_scan(neuron, x_seq, surrogate):
    """Multi-step forward of ``neuron`` over ``x_seq [T, N, ...]`` with ``surrogate`` gradients."""
    if not fusable(neuron):
        return step_loop(neuron, x_seq)
    if not (torch.is_grad_enabled() and x_seq.requires_grad):
        with torch.no_grad():
            return _NeuronScan.forward(_NoCtx(), x_seq, neuron, surrogate)
    return _NeuronScan.apply(x_seq, neuron, surrogate)


class _NoCtx:
    """Stand-in context for running the scan's forward without autograd."""

    def save_for_backward(self, *tensors):
        pass
