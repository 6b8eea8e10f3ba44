"""Fused multi-step neuron scan for training: one autograd node for the whole T loop.

The step loop of ``Neuron.multi_step`` records ~7 autograd nodes per step and saves their
inputs; on CPU that bookkeeping, not the arithmetic, dominates a neuron layer's training step.
``neuron_scan`` runs the same forward (bit-identical spikes: same float ops in the same order)
without autograd, stores only ``z[t] = H[t] - v_th`` (float32, or float16 under
``spike_store.scan_state``; or nothing, recomputed in backward from a training conv's saved input,
under ``scan_state("auto" | "recompute")``) and the spikes as uint8 (which ``spike_store`` also hands
to the next layer's saved input), and computes
backpropagation through time by hand (Wu 2019 STBP, eqs. 4-7, for the update below):

    H[t] = decay * V[t-1] + gain * X[t] (+ leak terms without gradient)
    S[t] = Θ(z[t]),  z[t] = H[t] - v_th,   Θ' := g(z)  (the surrogate)
    V[t] = H[t] - v_th * S[t]              (subtract)  |  H[t] * (1 - S[t]) + v_reset * S[t]  (zero)

    dL/dH[t] = dL/dS[t] * g[t] + b[t] * dL/dH[t+1]
    b[t]     = decay * (1 - v_th * g[t])                           (subtract)
             = decay * ((1 - S[t]) + (v_reset - H[t]) * g[t])      (zero)
    dL/dX[t] = gain * dL/dH[t]

STDB's ``Δt`` (steps since the last spike) is recomputed in the backward from the spikes implied
by ``z``. The gradient equals autograd's through the step loop up to float rounding (tested). It
applies to ``IF`` and ``LIF`` with a fixed threshold; any other neuron (ParametricLIF, a trainable
``v_th``, subclasses with their own charge, fire or reset) runs the step loop.
"""
from __future__ import annotations

import torch

from . import registry, spike_store


def step_loop(neuron, x_seq):
    """The reference multi-step loop: T calls of ``neuron.step`` under autograd."""
    if neuron.surrogate is not None and hasattr(neuron.surrogate, "reset"):
        neuron.surrogate.reset()   # multi-step state is local to the call (STDB's spike times)
    return neuron.step_loop(x_seq)


def _fused_record_class(neuron):
    """The registered class whose ``fused_scan`` hook describes ``neuron``'s charge: the nearest
    base with a record, if that record has the hook and ``neuron`` still uses its ``charge``."""
    for cls in type(neuron).__mro__:
        rec = registry.module_class_record(cls)
        if rec is not None:   # the nearest record describes the neuron (ALIF's: two states, no hook)
            ok = "fused_scan" in rec.hooks and type(neuron).charge is cls.charge
            return cls if ok else None
    return None


def linear_charge(neuron):
    """``(decay, gain)`` when ``H = decay * V + gain * X (+ const)``, else ``None`` (from the
    ``fused_scan`` hook of the neuron's op record)."""
    cls = _fused_record_class(neuron)
    return None if cls is None else registry.module_class_record(cls).hooks["fused_scan"](neuron)


def _is_linear(neuron, name):
    cls = _fused_record_class(neuron)
    return cls is not None and registry.module_class_record(cls).name == name


def fusable(neuron) -> bool:
    v_th, cls = neuron.v_th, type(neuron)
    neuron_cls = registry.record("snn.neuron").modules[0]  # the base class's fire (Θ) and reset
    return (linear_charge(neuron) is not None and cls.fire is neuron_cls.fire
            and cls.reset_membrane is neuron_cls.reset_membrane
            and neuron.reset_mode in ("subtract", "zero")  # "subtract_after_leak" (snntorch) runs the step loop
            and not (isinstance(v_th, torch.Tensor) and v_th.requires_grad))


def _charge(neuron, v, x, decay):
    # the same rounded ops as IF.charge / LIF.charge, in the same order (bit-identical forward);
    # v_leak and decay_input keep the neuron's own expression
    if _is_linear(neuron, "snn.if"):
        return v + x
    if neuron.v_leak != 0.0 or neuron.decay_input:
        return neuron.charge(v, x)
    return torch.mul(v, decay).add_(x)


def _native_plan(neuron, x_seq, surrogate):
    """The constants of the C scan (``snnc.ops.native``) when it applies, else None."""
    from . import native
    v_th = neuron.v_th
    own = type(surrogate).__module__ == f"{__package__}.surrogate"  # snnc's classes, not a user's subclass
    if (x_seq.dtype != torch.float32 or x_seq.device.type != "cpu" or not own or
            getattr(surrogate, "kind", None) not in native.SURROGATE_IDS or (isinstance(v_th, torch.Tensor) and v_th.numel() != 1)
            or isinstance(neuron.v_init, torch.Tensor)):
        return None
    lib = native.load()
    if lib is None:
        return None
    decay, gain = linear_charge(neuron)
    is_lif = _is_linear(neuron, "snn.lif")
    return lib, {"decay": decay, "gain": gain, "decay_input": is_lif and neuron.decay_input,
                 "v_leak": neuron.v_leak if is_lif else 0.0, "v_th": float(v_th),
                 "zero_reset": neuron.reset_mode == "zero", "v_reset": neuron.v_reset,
                 "v_init": neuron.v_init, "strict": neuron.compare == ">"}


def runs_native_scan(neuron) -> bool:
    """Whether a float32 CPU multi-step call of ``neuron`` (with autograd) runs the C scan, which
    reads a feature-major input as it lies (``native.feature_major``; no copy)."""
    return (getattr(neuron, "step_mode", None) == "m" and not getattr(neuron, "output_membrane", True)
            and fusable(neuron) and _native_plan(neuron, torch.empty(0), neuron.surrogate) is not None)


def _torch_forward(x_seq, neuron):
    """The scan in torch ops: ``(spikes, z)``, spikes bit-identical to the step loop."""
    decay, _ = linear_charge(neuron)
    v_th = neuron.v_th.detach() if isinstance(neuron.v_th, torch.Tensor) else neuron.v_th
    strict, subtract = neuron.compare == ">", neuron.reset_mode == "subtract"
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
    return out, z_seq


def steps_since_last_spike(fired, never, dtype=torch.float32):
    """``Δt[t] = t - (time of the last spike before t)`` from the saved spikes (STDB, Rathi 2020)."""
    fired = fired.bool()
    last = torch.full(fired.shape[1:], never, dtype=dtype)
    dts = torch.empty(fired.shape, dtype=dtype)
    for t in range(fired.shape[0]):
        torch.sub(t, last, out=dts[t])   # t - last, as the step loop computes it
        last = torch.where(fired[t], float(t), last)
    return dts


def _torch_backward(z, s8, grad_s, neuron, surrogate):
    decay, gain = linear_charge(neuron)
    z, fired = (z.float() if z.dtype == torch.float16 else z), s8.bool()
    v_th = neuron.v_th.detach() if isinstance(neuron.v_th, torch.Tensor) else neuron.v_th
    dt = None
    if getattr(surrogate, "needs_spike_times", False):
        dt = steps_since_last_spike(fired, surrogate.never_spiked, z.dtype)
    g = surrogate.derivative(z, v_th, dt)
    if neuron.reset_mode == "subtract":
        b = (1.0 - v_th * g).mul_(decay)
    else:
        b = (neuron.v_reset - (z + v_th)) * g
        b = b.add_((~fired).to(z.dtype)).mul_(decay)
    grad_h = grad_s * g
    for t in range(z.shape[0] - 2, -1, -1):
        grad_h[t].addcmul_(b[t], grad_h[t + 1])
    return grad_h.mul_(gain) if gain != 1.0 else grad_h


def _half(z):
    # saturate, then round to nearest even: what the C kernel's (half) conversion does
    return z.clamp(-65504.0, 65504.0).to(torch.float16)


def scan_forward(x_seq, neuron, surrogate, state_dtype=torch.float32, overwrite_input=False, keep_state=True):
    """``(spikes, spikes_u8, z, plan)``, ``z`` in ``state_dtype`` (None without ``keep_state``,
    where the native kernel runs): the native kernel when it applies (``plan`` not None), else
    torch. ``overwrite_input``: the native kernel may write the spikes over ``x_seq`` (the caller
    owns it and nothing reads it afterwards)."""
    plan = _native_plan(neuron, x_seq, surrogate)
    half = state_dtype == torch.float16
    if plan is not None:
        from .native import scan_forward as native_forward
        spikes, s8, z = native_forward(plan[0], x_seq, plan[1], half_state=half, overwrite_input=overwrite_input,
                                       keep_state=keep_state)
        return spikes, s8, z, plan
    spikes, z = _torch_forward(x_seq, neuron)
    return spikes, spikes.to(torch.uint8), (_half(z) if half else z), None


def _keep_graph() -> bool:
    """Whether this backward pass keeps the graph (``retain_graph``): then saved tensors are read
    again later and must not be overwritten. True when torch cannot say."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


class _NeuronScan(torch.autograd.Function):
    """The scan as one autograd node. What it keeps for backward: the uint8 spikes, and ``z``
    (float32 or float16) — or, under ``scan_state("recompute")`` where the input current is a
    training conv's output (``train_conv.recompute_recipe``; ``"auto"``: a cheap one), no ``z`` at all: backward recomputes
    the input current from the conv's own saved input (uint8 spikes or the float input) and
    weight, then ``z`` from it with the same forward loop, both bit-identical to the forward's,
    so the gradients are the same bits as with a saved float32 ``z``. Per neuron and step that is
    1 byte kept instead of 5, for one extra conv forward and scan forward per layer in backward."""

    @staticmethod
    def forward(ctx, x_seq, neuron, surrogate):
        from .train_conv import recompute_recipe
        where = spike_store.recompute_state()   # (the recipe is read before x_seq may be overwritten)
        recipe = recompute_recipe(x_seq, cheap_only=where == "auto") if where else None
        spikes, s8, z, plan = scan_forward(x_seq, neuron, surrogate, spike_store.state_dtype(),
                                           spike_store.may_overwrite_input(neuron), keep_state=recipe is None)
        ctx.neuron, ctx.surrogate, ctx.plan = neuron, surrogate, plan
        if recipe is None:
            ctx.save_for_backward(z, s8)   # the input current x_seq is not kept
        else:
            ctx.recipe = recipe[1]
            ctx.save_for_backward(None, s8, *recipe[0])   # (already saved by the conv: no new memory)
        spike_store.register(spikes, s8)
        return spikes

    @staticmethod
    def backward(ctx, grad_s):
        z, s8, *conv_saved = ctx.saved_tensors
        # dL/dX may overwrite z when z is ours alone: recomputed here, or saved but not needed again
        in_place = z is None or not _keep_graph()
        if z is None:
            from .train_conv import recompute
            z = _recompute_state(recompute(conv_saved, ctx.recipe), ctx.neuron, ctx.plan)
        if ctx.plan is not None:
            from .native import scan_backward
            lib, p = ctx.plan
            param = next(iter(ctx.surrogate.params.values()))
            return scan_backward(lib, z, s8, grad_s, p, ctx.surrogate.kind, param, in_place=in_place), None, None
        return _torch_backward(z, s8, grad_s, ctx.neuron, ctx.surrogate), None, None


def _recompute_state(x_seq, neuron, plan):
    """The forward's float32 ``z`` from its (recomputed) input current, written over it."""
    if plan is None:
        return _torch_forward(x_seq, neuron)[1]
    from .native import scan_state_in_place, time_major
    return scan_state_in_place(plan[0], x_seq if time_major(x_seq) else x_seq.contiguous(), plan[1])


def neuron_scan(neuron, x_seq, surrogate):
    """Multi-step forward of ``neuron`` over ``x_seq [T, N, ...]`` with ``surrogate`` gradients."""
    if not fusable(neuron):
        return step_loop(neuron, x_seq)
    if not (torch.is_grad_enabled() and x_seq.requires_grad):
        with torch.no_grad():
            return scan_forward(x_seq, neuron, surrogate)[0]   # (the uint8 copy is dropped at once)
    return _NeuronScan.apply(x_seq, neuron, surrogate)
