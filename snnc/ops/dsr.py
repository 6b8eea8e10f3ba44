"""DSR: differentiation on spike representation (Meng 2022).

A layer of IF/LIF neurons driven for T steps has a *representation*, its (weighted) firing
rate, that is a simple function of its (weighted) mean input:

    x̂ = Σ_t w_t * gain * X[t] / Σ_t w_t,    w_t = decay^(T-1-t)   (IF: decay = 1, w_t = 1)
    r  = A * Σ_t w_t S[t] / Σ_t w_t  ≈  clamp(x̂, 0, v_th) * A / v_th

(``A`` = spike amplitude). Meng's training backpropagates through ``r`` instead of through the
spikes: with ``G = Σ_t dL/dS[t]`` (the gradient a downstream layer gives the representation),

    dL/dX[t]  = G * gain * w_t / Σw * 1[0 <= x̂ <= v_th] * A / v_th
    dL/dv_th  = G * 1[x̂ > v_th]                 (A = v_th: Meng's neurons, trainable threshold)
              = -G * x̂ / v_th² * 1[0 <= x̂ <= v_th]   (A = 1: plain 0/1-spike neurons)

``DSRIF`` / ``DSRLIF`` are Meng's neurons: spikes of amplitude ``v_th``, fired when the membrane
reaches ``alpha * v_th`` and reset by subtracting ``v_th``. With inputs in ``[0, v_th]`` the
membrane then stays in ``[(alpha-1) v_th, alpha v_th)``, so the IF representation error
``|r - clamp(x̄, 0, v_th)|`` is below ``max(alpha, 1-alpha) * v_th / T``: ``v_th/T`` for
``alpha=1``, ``v_th/(2T)`` for ``alpha=0.5`` (Meng 2022, Sec. 4.3). The threshold is a trainable
per-layer scalar by default. The ``dsr`` surrogate (``insert_surrogate(kind="dsr")``) applies the
same backward to plain IF/LIF neurons (``A = 1``). The forward is always the exact spike loop.
"""
from __future__ import annotations

import torch

from .registry import FORWARD, register_op, same_as_input, seq_when_multi_step

from .neuron_scan import linear_charge
from .neurons import IF, LIF, heaviside


def _loop(neuron, x_seq):
    """The exact spike loop; plain neurons fire by their Heaviside, not through the surrogate."""
    own_firing = getattr(neuron, "builtin_backward", False)
    v = neuron.initial_membrane(x_seq[0])
    out = []
    for t in range(x_seq.shape[0]):
        h = neuron.charge(v, x_seq[t])
        s = neuron.fire(h) if own_firing else heaviside(h - neuron.v_th, neuron.compare == ">")
        v = neuron.reset_membrane(h, s)
        out.append(s)
    return torch.stack(out)


class _DSRSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_seq, v_th, neuron, amplitude_is_threshold):
        with torch.no_grad():
            out = _loop(neuron, x_seq)
        ctx.neuron, ctx.amp_is_vth = neuron, amplitude_is_threshold
        ctx.save_for_backward(x_seq, v_th)
        return out

    @staticmethod
    def backward(ctx, grad_s):
        x_seq, v_th = ctx.saved_tensors
        decay, gain = linear_charge(ctx.neuron)
        T = x_seq.shape[0]
        w = decay ** torch.arange(T - 1, -1, -1, dtype=x_seq.dtype, device=x_seq.device)
        w = (w / w.sum()).view(T, *([1] * (x_seq.dim() - 1)))
        x_hat = (w * x_seq).sum(0) * gain
        inside = ((x_hat >= 0) & (x_hat <= v_th)).to(x_seq.dtype)
        G = grad_s.sum(0)
        scale = 1.0 if ctx.amp_is_vth else 1.0 / v_th
        grad_x = (G * inside * scale * gain).unsqueeze(0) * w
        grad_v = None
        if ctx.needs_input_grad[1]:
            if ctx.amp_is_vth:
                per_elem = G * (x_hat > v_th).to(x_seq.dtype)
            else:
                per_elem = -G * x_hat / v_th.square() * inside
            grad_v = _sum_to(per_elem, v_th.shape)
        return grad_x, grad_v, None, None


def _sum_to(t, shape):
    """Reduce a per-element gradient to the (broadcast) shape of the threshold."""
    if t.shape == shape:
        return t
    lead = t.dim() - len(shape)
    t = t.sum(dim=tuple(range(lead))) if lead > 0 else t
    dims = tuple(i for i, n in enumerate(shape) if n == 1 and t.shape[i] != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def dsr_sequence(neuron, x_seq, amplitude_is_threshold: bool):
    """Multi-step forward of an IF/LIF ``neuron`` with Meng 2022's representation backward."""
    if linear_charge(neuron) is None:
        raise TypeError(f"DSR needs an IF or LIF neuron (linear charge), got {type(neuron).__name__}")
    v_th = neuron.v_th if isinstance(neuron.v_th, torch.Tensor) else torch.tensor(neuron.v_th, dtype=x_seq.dtype)
    return _DSRSequence.apply(x_seq, v_th, neuron, amplitude_is_threshold)


class _DSRFiring:
    """Meng's firing and reset: ``S = v_th * Θ(H - alpha v_th)``, ``V = H - S``."""

    builtin_backward = True  # insert_surrogate leaves these neurons alone

    def _init_dsr(self, alpha):
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"{type(self).__name__}: alpha={alpha} must lie in (0, 1]")
        if self.reset_mode != "subtract":
            raise ValueError(f"{type(self).__name__}: DSR neurons reset by subtraction (Meng 2022)")
        self.alpha = float(alpha)

    def fire(self, h):
        return heaviside(h - self.alpha * self.v_th, self.compare == ">") * self.v_th

    def reset_membrane(self, h, s):
        return h - s

    def multi_step(self, x_seq):
        return dsr_sequence(self, x_seq, amplitude_is_threshold=True)

    def dsr_attrs(self, base):
        a = dict(base)
        a["alpha"] = self.alpha
        a.pop("surrogate", None)
        return a


class DSRIF(_DSRFiring, IF):
    """Meng 2022 IF neuron: ``H = V + X``, spikes of amplitude ``v_th`` at ``H >= alpha v_th``."""

    op_name = "snn.dsr_if"

    def __init__(self, v_th=1.0, alpha=1.0, learn_threshold=True, **kw):
        super().__init__(v_th=v_th, learn_threshold=learn_threshold, **kw)
        self._init_dsr(alpha)

    def attrs(self):
        return self.dsr_attrs(IF.attrs(self))


class DSRLIF(_DSRFiring, LIF):
    """Meng 2022 LIF neuron (weighted-rate representation ``w_t = decay^(T-1-t)``)."""

    op_name = "snn.dsr_lif"

    def __init__(self, tau=None, decay=None, v_th=1.0, alpha=1.0, learn_threshold=True, **kw):
        super().__init__(tau=tau, decay=decay, v_th=v_th, learn_threshold=learn_threshold, **kw)
        self._init_dsr(alpha)

    def attrs(self):
        return self.dsr_attrs(LIF.attrs(self))


# fused_scan: the linear charge (decay, gain) DSR's sequence backward needs; their own fire and
# reset keep them off the surrogate scan (neuron_scan.fusable)
register_op(DSRIF, spiking="yes", state=("v",), over_time="loop", accepts=seq_when_multi_step,
            shape=same_as_input, hooks={"onnx": FORWARD, "fused_scan": lambda n: (1.0, 1.0)})
register_op(DSRLIF, spiking="yes", state=("v",), over_time="loop", accepts=seq_when_multi_step,
            shape=same_as_input, hooks={"onnx": FORWARD, "fused_scan": lambda n: (n.decay, n.gain)})
