"""Current-based neurons: a synaptic current filter in front of a LIF membrane (NIR's ``CubaLIF``,
snntorch's ``Synaptic``, norse's ``LIFCell`` / ``LIFBoxCell``) and its non-spiking readout (NIR's
``CubaLI``, ``LI`` and ``I``, norse's ``LICell``). One record per semantics: each peer's exact
discretisation is a parameter of these two ops, not a separate op.

NIR (Pedersen et al., Nat. Commun. 2024, Table 1) writes the current-based LIF in continuous time:

    tau_syn dI/dt = -I + w_in X            tau_mem dV/dt = (v_leak - V) + r I

``form="decay"`` (NIR, snntorch): one forward-Euler step of length ``dt`` with the current updated
before the membrane reads it, written with decay factors:

    I[t] = alpha I[t-1] + gain_in X[t]                      alpha = 1 - dt/tau_syn, gain_in = w_in dt/tau_syn
    H[t] = v_leak + beta (V[t-1] - v_leak) + gain I[t]      beta  = 1 - dt/tau_mem, gain    = r dt/tau_mem

``form="euler"`` (norse, ``lif_feed_forward_step``): the same step in norse's operation order, with
``k_syn = dt tau_syn_inv`` and ``k_mem = dt tau_mem_inv`` rounded to float32 as norse computes them;
the stored current is the one already decayed for the next step:

    J    = I[t-1] + gain_in X[t]                            (the input jumps the current)
    H[t] = V[t-1] + k_mem ((v_leak - V[t-1]) + J)           (``current=False``, LIFBoxCell:
    I[t] = J + (-k_syn) J                                    H = V + k_mem ((X + v_leak) - V), I = 0)

so alpha = 1 - k_syn, beta = 1 - k_mem, gain = k_mem in the decay form's terms (what NIR export
writes). Then, for both forms:

    S[t] = Θ(H[t] - v_th)                                   (compare ">" as NIR / norse / snntorch, or ">=")
    V[t] = H[t] (1 - S[t]) + v_reset S[t]                   reset="zero": NIR, norse
         | H[t] - v_th S[t]                                 reset="subtract"
         | H[t] - v_th Θ(V[t-1] - v_th)                     reset="subtract_after_leak": snntorch's default,
                                                                     the deferred reset (spike from H - ...)
         | H[t] - H[t] Θ(V[t-1] - v_th)                     reset="zero_after_leak": snntorch's "zero"
                                                                     (the whole step is zeroed, input included)
         | H[t]                                             reset="none"
    I[-1] = 0, V[-1] = v_init (v_leak unless given)

(for the deferred resets S[t] is fired from the reset value, as snntorch does). ``CurrentLI`` is the
same without fire and reset: it outputs ``V[t]``. With ``alpha = 0, gain_in = 1`` it is NIR's
``LI``; with ``beta = 1`` too, NIR's ``I``.

``alpha`` / ``beta`` / ``v_th`` may be per-neuron tensors (snntorch's per-neuron parameters). The
update is written once, in ``update``, with plain arithmetic and ``math.heaviside``, so it is the
torch reference and, evaluated on TIR values, the body of TVM's multi-state scan kernel
(``tvm_kernels.state_scan_kernel``; tensor parameters or reported states lower from the exported
forward instead). ``report`` names the states returned after the output, in the peer's order
(``("i", "v")``: snntorch's ``spk, syn, mem``; ``("v", "i")``: norse's ``z, (v, i)``).
"""
from __future__ import annotations

import torch

from .neurons import LIF, MultiStateNeuron, TorchMath
from .registry import FORWARD, register_op, seq_when_multi_step

FORMS = ("decay", "euler")
RESETS = ("zero", "subtract", "subtract_after_leak", "zero_after_leak", "none")


def _param(name, value, cls, unit=True):
    """A float, or a float32 tensor for per-neuron values; checked to lie in [0, 1]."""
    if isinstance(value, torch.Tensor) and value.numel() > 1:
        t = value.detach().float().clone()
        if unit and not bool(((t >= 0) & (t <= 1)).all()):
            raise ValueError(f"{cls}: every {name} value must lie in [0, 1]")
        return t
    v = float(value)
    if unit and not 0.0 <= v <= 1.0:
        raise ValueError(f"{cls}: {name}={v} must lie in [0, 1]")
    return v


def f32_product(dt, rate) -> float:
    """``dt * rate`` as norse computes it (a Python float times a float32 tensor), as a float."""
    return float(float(dt) * torch.as_tensor(rate, dtype=torch.float32))


def _show(v):
    return v if not isinstance(v, torch.Tensor) else f"f32{list(v.shape)}"


class _TwoState(MultiStateNeuron, LIF):
    """The parameters shared by both current-based neurons; the state tuple is ``(i, v)``."""

    state_names = ("i", "v")

    def __init__(self, alpha, beta, gain_in, gain, v_leak, v_init, form="decay", current=True,
                 report=None, **kw):
        cls = type(self).__name__
        if form not in FORMS:
            raise ValueError(f"{cls}: form={form!r}; expected one of {FORMS}")
        reset = kw.pop("reset", "zero")
        if reset not in RESETS:
            raise ValueError(f"{cls}: reset={reset!r}; expected one of {RESETS}")
        alpha, beta = _param("alpha", alpha, cls), _param("beta", beta, cls)
        super().__init__(decay=beta if isinstance(beta, torch.Tensor) else float(beta), v_leak=v_leak,
                         v_init=float(v_leak if v_init is None else v_init),
                         reset="zero" if reset == "zero_after_leak" else reset, **kw)
        self.reset_mode = reset
        for name, value in (("alpha", alpha), ("beta", beta)):
            if isinstance(value, torch.Tensor):
                self.register_buffer(name, value)
            else:
                setattr(self, name, value)
        self.gain_in, self.gain_mem = float(gain_in), float(gain)
        self.form, self.current = form, bool(current)
        if form == "euler":  # norse's float32 constants (``norse`` sets the exact products)
            self.k_syn, self.k_mem = 1.0 - alpha, self.gain_mem
        self.report = None if not report else tuple(report)

    @property
    def output_state(self) -> bool:
        return self.report is not None

    @output_state.setter
    def output_state(self, value):
        if not value:
            self.report = None
        elif self.report is None:
            self.report = ("i", "v")

    @classmethod
    def norse(cls, tau_syn_inv, tau_mem_inv, v_leak=0.0, dt=0.001, current=True, **kw):
        """norse's parameters (``LIFParameters`` / ``LIParameters`` and the cell's ``dt``)."""
        k_syn = f32_product(dt, tau_syn_inv) if current else 0.0
        k_mem = f32_product(dt, tau_mem_inv)
        v_leak = float(torch.as_tensor(v_leak, dtype=torch.float32))
        m = cls(alpha=1.0 - k_syn, beta=1.0 - k_mem, gain=k_mem, v_leak=v_leak, form="euler",
                current=current, **kw)
        m.k_syn, m.k_mem = k_syn, k_mem
        return m

    def membrane(self, i, v, x):
        """``(H[t], I[t])`` from the previous ``(i, v)`` and the input, in the form's order."""
        if self.form == "euler":
            if not self.current:
                return v + self.k_mem * ((x + self.v_leak) - v), i
            j = i + self.gain_in * x
            return v + self.k_mem * ((self.v_leak - v) + j), j + (-self.k_syn) * j
        i = self.alpha * i + self.gain_in * x
        if self.v_leak == 0.0:
            return self.beta * v + self.gain_mem * i, i
        return self.v_leak + self.beta * (v - self.v_leak) + self.gain_mem * i, i

    def initial_state(self, x):
        return (torch.zeros_like(x), torch.full_like(x, self.v_init))

    def step(self, x, state):
        """``update``, with a state passed on unchanged (the box form's zero current) or returned
        as the output (the LI's voltage) copied: an ONNX ``Scan`` carry must not alias."""
        s, new = self.update(x, state)
        new = tuple(n.clone() if any(n is o for o in state) else n for n in new)
        return (s.clone() if any(s is n for n in new) else s), new

    def _reported(self, out, state):
        named = dict(zip(self.state_names, state))
        return (out, *[named[k] for k in self.report])

    def forward(self, x):
        if self.report is None:
            return super().forward(x)
        if self.step_mode == "m":
            return self.multi_step(x)
        if self.v is None or self.v[0].shape != x.shape:
            self.v = self.initial_state(x)
        s, self.v = self.update(x, self.v)
        return self._reported(s, self.v)

    def multi_step(self, x_seq):
        if self.report is None:
            return super().multi_step(x_seq)
        state, rows = self.initial_state(x_seq[0]), []
        for t in range(x_seq.shape[0]):
            s, state = self.update(x_seq[t], state)
            rows.append(self._reported(s, state))
        return tuple(torch.stack([r[k] for r in rows]) for k in range(len(rows[0])))

    def scalar_params(self) -> bool:
        """Whether every constant of ``update`` is one value (what the fused TVM scan takes)."""
        return not any(isinstance(getattr(self, n, None), torch.Tensor) and getattr(self, n).numel() > 1
                       for n in ("alpha", "beta", "v_th", "k_syn"))

    def two_state_attrs(self):
        if self.form == "euler":
            a = {"form": "euler", "dt_tau_mem_inv": self.k_mem}
            if self.current:
                a["dt_tau_syn_inv"] = _show(self.k_syn)
            else:
                a["current"] = False
        else:
            a = {"alpha": _show(self.alpha), "beta": _show(self.beta)}
        if self.gain_in != 1.0:
            a["gain_in"] = self.gain_in
        if self.gain_mem != 1.0 and self.form == "decay":
            a["gain"] = self.gain_mem
        if self.v_leak != 0.0:
            a["v_leak"] = self.v_leak
        if self.report is not None:
            a["report"] = ",".join(self.report)
        return a


class CurrentLIF(_TwoState):
    """Current-based LIF (NIR ``CubaLIF``, norse ``LIFCell``/``LIFBoxCell``, snntorch ``Synaptic``);
    see the module docstring for the update. Defaults: NIR's reset to ``v_reset``, strict compare."""

    op_name = "snn.current_lif"

    def __init__(self, alpha=0.5, beta=0.5, gain_in=1.0, gain=1.0, v_leak=0.0, v_th=1.0, v_reset=0.0,
                 reset="zero", compare=">", v_init=None, **kw):
        super().__init__(alpha, beta, gain_in, gain, v_leak, v_init, v_th=v_th, v_reset=v_reset,
                         reset=reset, compare=compare, **kw)

    def update(self, x, state, math=TorchMath, rec=None):
        """One step on ``state = (i, v)``: returns ``(spikes, (i, v))``. ``rec`` (a recurrent
        input, ``snn.rsynaptic``) joins the current after its update, as snntorch adds it."""
        i, v = state
        strict = self.compare == ">"
        h, i = self.membrane(i, v, x) if rec is None else self._membrane_rec(i, v, x, rec)
        if self.reset_mode == "subtract_after_leak":   # snntorch: R[t] from V[t-1], subtracted after the leak
            h = h - self.v_th * math.heaviside(v - self.v_th, strict)
        elif self.reset_mode == "zero_after_leak":     # snntorch's "zero": the whole step is zeroed
            h = h - h * math.heaviside(v - self.v_th, strict)
        z = h - self.v_th
        s = self.surrogate(z, self) if self.surrogate is not None and math is TorchMath else math.heaviside(z, strict)
        if self.reset_mode == "zero":
            v = h * (1.0 - s) + self.v_reset * s
        elif self.reset_mode == "subtract":
            v = h - self.v_th * s
        else:
            v = h
        return s, (i, v)

    def _membrane_rec(self, i, v, x, rec):
        i = self.alpha * i + self.gain_in * x + rec
        return self.beta * v + self.gain_mem * i, i

    def attrs(self):
        a = {**self.two_state_attrs(), **self.common_attrs()}
        a.pop("output_membrane", None)
        if self.reset_mode == "zero_after_leak":
            a.pop("v_reset", None)
        return a


class CurrentLI(_TwoState):
    """Current-based leaky integrator (NIR ``CubaLI``; ``LI`` with ``alpha=0``; ``I`` with
    ``beta=1`` too; norse ``LICell`` in the euler form): non-spiking, outputs the membrane ``V[t]``."""

    op_name = "snn.current_li"
    spiking_output = "no"

    def __init__(self, alpha=0.0, beta=0.5, gain_in=1.0, gain=1.0, v_leak=0.0, v_init=None, **kw):
        super().__init__(alpha, beta, gain_in, gain, v_leak, v_init, **kw)

    def update(self, x, state, math=TorchMath, rec=None):
        i, v = state
        v, i = self.membrane(i, v, x if rec is None else x + rec)
        return v, (i, v)

    def attrs(self):
        a = self.two_state_attrs()
        if self.v_init != self.v_leak:
            a["v_init"] = self.v_init
        return a


# no shape rule: with ``report`` the output is a tuple, so shapes come from running on fake tensors
_RECORD = dict(state=("i", "v"), over_time="loop", accepts=seq_when_multi_step)
_HOOKS = {"onnx": FORWARD, "tvm": "snnc.targets.tvm_lower:_convert_neuron", "nir_out": FORWARD}
register_op(CurrentLIF, spiking="yes", hooks=_HOOKS, **_RECORD)
register_op(CurrentLI, spiking="no", hooks=_HOOKS, **_RECORD)
