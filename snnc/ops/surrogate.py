"""Surrogate gradients: the forward is the exact Heaviside of ``Neuron.fire``, the backward a
smooth stand-in for its derivative (the only change training makes to a spiking graph).

A surrogate is a small picklable object that a neuron calls as ``surrogate(z, neuron)`` with
``z = H[t] - v_th``; it returns the spikes ``Θ(z)`` (``1[z >= 0]``, or ``1[z > 0]`` when the
neuron's ``compare`` is ``">"``) bit-identical to the inference graph, and backpropagates
``dL/dz = dL/dS * g(z)`` with ``g`` below (derivatives are w.r.t. the membrane):

    rectangular  g = 1/a * 1[|z| < a/2]                      Wu 2019 (STBP) eq. 8, a = 1
    sigmoid      g = alpha * σ(alpha z) * (1 - σ(alpha z))   spikingjelly's Sigmoid, alpha = 4
    atan         g = (alpha/2) / (1 + (π/2 * alpha * z)^2)   Fang 2021 / spikingjelly ATan, alpha = 2
    triangle     g = gamma * max(0, 1 - |z|/v_th) / v_th     Rathi 2020 linear surrogate, gamma = 0.3
    stdb         g = alpha * exp(-beta * Δt) / v_th          Rathi 2020 STDB, alpha = 0.3, beta = 0.01
    dsr          representation-based backward over the whole sequence (Meng 2022; ``snnc.ops.dsr``)

Rathi's code differentiates w.r.t. the normalised membrane ``u/v_th - 1``; the chain rule turns
that into the ``1/v_th`` above, so a converted net with large balanced thresholds gets the same
gradient scale as Rathi's. ``Δt`` is the number of steps since the neuron's last spike (its own
spike at this step not yet counted); a neuron that has not spiked yet has its last spike at
``t = -1000`` as in Rathi's code, i.e. a near-zero gradient until it first fires.

Multi-step neurons call ``surrogate.multi_step(neuron, x_seq)``: IF/LIF neurons then run the
fused scan of ``snnc.ops.neuron_scan`` (same forward, hand-written BPTT backward that stores one
tensor); other neurons, and ``stdb``, run the step loop with this module's autograd function.
Each neuron needs its own surrogate instance (``stdb`` keeps per-neuron state in single-step
mode): ``insert_surrogate`` creates one per neuron.
"""
from __future__ import annotations

import abc
import math

import torch

from .neurons import heaviside

# Rathi 2020's code initialises the last-spike time to -1000: "never spiked" = a tiny gradient.
NEVER_SPIKED = -1000.0


class _SpikeFunction(torch.autograd.Function):
    """Forward: Heaviside. Backward: ``grad * surrogate.derivative(z, v_th, dt)``."""

    @staticmethod
    def forward(ctx, z, surrogate, v_th, strict, dt):
        ctx.surrogate, ctx.v_th, ctx.dt = surrogate, v_th, dt
        ctx.save_for_backward(z)
        return heaviside(z, strict)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * ctx.surrogate.derivative(z, ctx.v_th, ctx.dt), None, None, None, None


def _threshold(neuron):
    v = neuron.v_th
    return v.detach() if isinstance(v, torch.Tensor) else v


class Surrogate(abc.ABC):
    """Base class: subclasses set ``kind``, ``defaults`` and define ``derivative``."""

    kind = "surrogate"
    defaults: dict = {}

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.defaults))
        if unknown:
            raise ValueError(f"surrogate {self.kind!r}: unknown parameter(s) {unknown}; "
                             f"it takes {sorted(self.defaults)}")
        self.params = {**self.defaults, **{k: float(v) for k, v in params.items()}}
        for k, v in self.params.items():
            if v <= 0:
                raise ValueError(f"surrogate {self.kind!r}: {k}={v} must be > 0")

    @abc.abstractmethod
    def derivative(self, z, v_th, dt=None):
        """``dΘ/dz`` stand-in evaluated at ``z`` (``v_th``: the neuron's threshold, detached)."""

    def __call__(self, z, neuron):
        return _SpikeFunction.apply(z, self, _threshold(neuron), neuron.compare == ">", None)

    def multi_step(self, neuron, x_seq):
        from .neuron_scan import neuron_scan
        return neuron_scan(neuron, x_seq, self)

    def reset(self):
        pass

    def __repr__(self):
        return f"{self.kind}(" + ", ".join(f"{k}={v:g}" for k, v in self.params.items()) + ")"

    def __eq__(self, other):
        return type(other) is type(self) and other.params == self.params

    __hash__ = object.__hash__


class Rectangular(Surrogate):
    """Wu 2019 eq. 8: a box of width ``a`` and height ``1/a`` around the threshold."""

    kind, defaults = "rectangular", {"a": 1.0}

    def derivative(self, z, v_th, dt=None):
        a = self.params["a"]
        return (z.abs() < a / 2).to(z.dtype) / a


class Sigmoid(Surrogate):
    kind, defaults = "sigmoid", {"alpha": 4.0}

    def derivative(self, z, v_th, dt=None):
        sg = torch.sigmoid(self.params["alpha"] * z)
        return self.params["alpha"] * sg * (1.0 - sg)


class ATan(Surrogate):
    kind, defaults = "atan", {"alpha": 2.0}

    def derivative(self, z, v_th, dt=None):
        alpha = self.params["alpha"]
        return (alpha / 2) / (1 + (math.pi / 2 * alpha * z).square())


class Triangle(Surrogate):
    """Rathi 2020's linear surrogate ``gamma * max(0, 1 - |u/v_th - 1|)`` w.r.t. ``u/v_th``."""

    kind, defaults = "triangle", {"gamma": 0.3}

    def derivative(self, z, v_th, dt=None):
        return self.params["gamma"] * (1.0 - z.abs() / v_th).clamp(min=0.0) / v_th


class STDB(Surrogate):
    """Rathi 2020 spike-time-dependent backprop: ``alpha * exp(-beta * Δt)`` w.r.t. ``u/v_th``.

    Δt needs the time of each neuron's last spike. Multi-step (fused scan): recomputed from the
    spike train in the backward. Single-step: kept in this object (``self._t``, ``self._last``)
    until ``reset()``.
    """

    kind, defaults = "stdb", {"alpha": 0.3, "beta": 0.01}
    needs_spike_times = True      # the fused scan recomputes Δt from the spikes in its backward
    never_spiked = NEVER_SPIKED

    def __init__(self, **params):
        super().__init__(**params)
        self.reset()

    def derivative(self, z, v_th, dt=None):
        return self.params["alpha"] * torch.exp(-self.params["beta"] * dt) / v_th

    def _fire(self, z, neuron, t, last):
        dt = t - last   # steps since the last spike, before this step's spike
        s = _SpikeFunction.apply(z, self, _threshold(neuron), neuron.compare == ">", dt)
        return s, torch.where(s.detach() > 0, torch.full_like(last, float(t)), last)

    def __call__(self, z, neuron):
        if self._last is None or self._last.shape != z.shape:
            self._t, self._last = 0, torch.full_like(z, NEVER_SPIKED).detach()
        s, self._last = self._fire(z, neuron, self._t, self._last)
        self._t += 1
        return s

    def reset(self):
        self._t, self._last = 0, None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_t"], state["_last"] = 0, None
        return state


class DSR:
    """Meng 2022 differentiation on spike representation, for plain IF/LIF neurons (0/1 spikes):
    the backward of the whole sequence is that of the representation ``r ≈ clamp(x̂/v_th, 0, 1)``
    (``snnc.ops.dsr``). Multi-step only: the gradient of one step depends on all T inputs, so
    this is not a per-step ``Surrogate``."""

    kind = "dsr"

    def __init__(self, **params):
        if params:
            raise ValueError(f"surrogate 'dsr' takes no parameters, got {sorted(params)}")
        self.params = {}

    def reset(self):
        pass

    def __eq__(self, other):
        return type(other) is DSR

    __hash__ = object.__hash__

    def __call__(self, z, neuron):
        raise TypeError(f"surrogate 'dsr' on {type(neuron).__name__} in single-step mode: DSR's "
                        "backward needs the whole sequence; unroll the graph (unroll_timesteps) first")

    def multi_step(self, neuron, x_seq):
        from .dsr import dsr_sequence
        return dsr_sequence(neuron, x_seq, amplitude_is_threshold=False)

    def __repr__(self):
        return "dsr"


SURROGATES = {cls.kind: cls for cls in (Rectangular, Sigmoid, ATan, Triangle, STDB, DSR)}


def make_surrogate(kind: str, **params):
    """A fresh surrogate of ``kind`` (one of ``SURROGATES``) with ``params`` over its defaults."""
    if kind not in SURROGATES:
        raise ValueError(f"unknown surrogate kind {kind!r}; known: {sorted(SURROGATES)}")
    return SURROGATES[kind](**params)
