"""Spiking neurons: one documented semantics each, single-step and multi-step.

Every neuron follows the same three-phase update (spikingjelly's charge / fire / reset order):

    charge:  H[t] = f(V[t-1], X[t])                      (per neuron type, below)
    fire:    S[t] = Θ(H[t] - v_th)                        Θ(z) = 1[z >= 0]  (compare=">=")
                                                          Θ(z) = 1[z > 0]   (compare=">", Wu 2019)
    reset:   V[t] = H[t] - v_th * S[t]                    (reset="subtract", Rueckauer 2017)
             V[t] = H[t] * (1 - S[t]) + v_reset * S[t]    (reset="zero", hard reset to v_reset)
             V[t] = H[t], and the next charge subtracts   (reset="subtract_after_leak", snntorch's
                    v_th * Θ(V[t-1] - v_th) after the leak: Leaky: H[t] = beta V[t-1] + X[t] - v_th S[t-1],
                    H[t] = f(V[t-1], X[t]) - v_th * Θ(V[t-1] - v_th)      the reset is not decayed)
             V[t] = H[t]                                  (reset="none", snntorch's reset_mechanism="none")
    V[-1] = v_init

Layouts: with ``step_mode="m"`` the input is ``[T, N, ...]`` and the loop over T runs inside
``forward`` with the membrane as a local variable (no state survives the call). With
``step_mode="s"`` the input is one step ``[N, ...]`` and the membrane lives in ``self.v`` between
calls until ``reset()`` (``snnc.reset(model)`` resets every op). ``self.v`` is a plain attribute,
not a buffer: it is not part of ``state_dict``.

``v_th`` and ``v_init`` are floats or tensors broadcastable to one sample (e.g. ``[C, 1, 1]`` for a
per-channel threshold after channel-wise balancing, and a membrane starting at half of it). ``learn_threshold=True`` makes it a ``Parameter``.
``output_membrane=True`` makes the neuron return ``(S, H)`` instead of ``S``: the spikes and the
membrane before this step's reset (what snntorch's ``spk, mem = lif(x, mem)`` and
``init_hidden=True, output=True`` report; for ``subtract_after_leak`` and ``none`` it is the state).
``surrogate`` selects the backward of Θ for training (``None``: no gradient through spikes);
the forward is Θ whatever the surrogate.
"""
from __future__ import annotations

import abc
import math

import torch
from torch import nn

from .registry import FORWARD, register_op, same_as_input, seq_when_multi_step

def heaviside(z, strict: bool):
    """``Θ(z)`` exactly as ``Neuron.fire`` computes it (same ops, same dtype)."""
    return (z > 0).to(z.dtype) if strict else (z >= 0).to(z.dtype)


_RESETS = ("subtract", "zero", "subtract_after_leak", "none")
_COMPARES = (">=", ">")


def has_v_init(neuron) -> bool:
    """True when the membrane does not start at 0 (``v_init`` a non-zero float or a tensor)."""
    v = neuron.v_init
    return bool((v != 0).any()) if isinstance(v, torch.Tensor) else v != 0.0


class Neuron(nn.Module, abc.ABC):
    """Base class of snnc neurons; subclasses define ``charge(v, x)`` and ``attrs()``."""

    op_name = "snn.neuron"

    def __init__(self, v_th=1.0, v_reset=0.0, reset="subtract", compare=">=", v_init=0.0,
                 learn_threshold=False, surrogate=None, step_mode="s", output_membrane=False):
        super().__init__()
        self.output_membrane = bool(output_membrane)
        if reset not in _RESETS:
            raise ValueError(f"reset={reset!r}: expected one of {_RESETS}")
        if compare not in _COMPARES:
            raise ValueError(f"compare={compare!r}: expected one of {_COMPARES}")
        if step_mode not in ("s", "m"):
            raise ValueError(f"step_mode={step_mode!r}: expected 's' (single step) or 'm' (multi-step)")
        if isinstance(v_th, torch.Tensor) or learn_threshold:
            v_th = torch.as_tensor(v_th, dtype=torch.float32).clone()
            if learn_threshold:
                self.v_th = nn.Parameter(v_th)
            else:
                self.register_buffer("v_th", v_th)
        else:
            self.v_th = float(v_th)
        self.v_reset = float(v_reset)
        self.reset_mode = reset
        self.compare = compare
        if isinstance(v_init, torch.Tensor) and v_init.numel() > 1:
            # one start value per channel, e.g. half of a per-channel threshold (Bu 2022) after
            # channel-wise conversion of a residual net
            self.register_buffer("v_init", v_init.detach().to(torch.float32).clone())
        else:
            self.v_init = float(v_init)
        self.surrogate = surrogate
        self.step_mode = step_mode
        self.v = None

    # -- semantics -------------------------------------------------------------------------
    @abc.abstractmethod
    def charge(self, v, x):
        """The membrane before firing, H[t], from V[t-1] and X[t]."""

    def fire(self, h):
        z = h - self.v_th
        if self.surrogate is not None:
            return self.surrogate(z, self)
        return (z >= 0).to(h.dtype) if self.compare == ">=" else (z > 0).to(h.dtype)

    def reset_membrane(self, h, s):
        if self.reset_mode == "subtract":
            return h - self.v_th * s
        if self.reset_mode in ("subtract_after_leak", "none"):
            return h
        return h * (1.0 - s) + self.v_reset * s

    def step(self, x, v):
        """One time step: returns ``(spikes, new_membrane)``."""
        s, v, _ = self.step_full(x, v)
        return s, v

    def step_full(self, x, v):
        """One time step: ``(spikes, new_membrane, membrane before the reset)``."""
        h = self.charge(v, x)
        if self.reset_mode == "subtract_after_leak":  # S[t-1] recomputed from V[t-1], as snntorch does
            z = v - self.v_th
            h = h - self.v_th * ((z >= 0) if self.compare == ">=" else (z > 0)).to(h.dtype)
        s = self.fire(h)
        return s, self.reset_membrane(h, s), h

    def initial_membrane(self, x):
        if isinstance(self.v_init, torch.Tensor):
            return torch.zeros_like(x) + self.v_init.to(x.dtype)
        return torch.full_like(x, self.v_init)

    def forward(self, x):
        if self.step_mode == "m":
            return self.multi_step(x)
        if self.v is None or self.v.shape != x.shape:
            self.v = self.initial_membrane(x)
        s, self.v, h = self.step_full(x, self.v)
        return (s, h) if self.output_membrane else s

    def multi_step(self, x_seq):
        """``[T, N, ...] -> [T, N, ...]``: the iterative update of Wu 2019, state kept local."""
        if self.output_membrane:
            return self.step_loop(x_seq)
        if self.surrogate is not None and hasattr(self.surrogate, "multi_step"):
            return self.surrogate.multi_step(self, x_seq)
        return self.step_loop(x_seq)

    def step_loop(self, x_seq):
        """The reference loop: T calls of ``step`` with the membrane as a local variable."""
        v = self.initial_membrane(x_seq[0])
        out, mem = [], []
        for t in range(x_seq.shape[0]):
            if self.output_membrane:
                s, v, h = self.step_full(x_seq[t], v)
                mem.append(h)
            else:
                s, v = self.step(x_seq[t], v)
            out.append(s)
        return (torch.stack(out), torch.stack(mem)) if self.output_membrane else torch.stack(out)

    def reset(self):
        self.v = None
        if self.surrogate is not None and hasattr(self.surrogate, "reset"):
            self.surrogate.reset()

    # -- description -------------------------------------------------------------------------
    def attrs(self) -> dict:
        """Attributes shown in the IR dump, in a fixed order."""
        return {}

    def common_attrs(self) -> dict:
        a = {"v_th": self.v_th}
        if self.reset_mode == "zero":
            a["v_reset"] = self.v_reset
        a["reset"] = self.reset_mode
        if self.compare != ">=":
            a["compare"] = self.compare
        if has_v_init(self):
            a["v_init"] = self.v_init
        if self.surrogate is not None:
            a["surrogate"] = self.surrogate
        if self.output_membrane:
            a["output_membrane"] = True
        return a

    def extra_repr(self):
        return ", ".join(f"{k}={v}" for k, v in self.attrs().items()) + f", step_mode={self.step_mode}"


class TorchMath:
    """The non-arithmetic helpers an ``update`` may use, on torch tensors (the TVM lowering passes
    TIR forms with the same names)."""

    @staticmethod
    def heaviside(z, strict):
        return heaviside(z, strict)


class MultiStateNeuron(Neuron):
    """Base of neurons with several state variables (their op record's ``state``, e.g. ``("v", "a")``).

    Subclasses define ``initial_state(x) -> tuple`` and ``update(x, state, math=TorchMath) ->
    (spikes, state)`` with plain arithmetic and ``math.heaviside``: that one method is the torch
    reference, and evaluated on TIR values the body of the TVM scan kernel. Single-step mode keeps
    the tuple in ``self.v`` between calls; multi-step mode keeps it local to the call."""

    def update(self, x, state, math=TorchMath):
        raise NotImplementedError

    def initial_state(self, x):
        raise NotImplementedError

    def step(self, x, state):
        return self.update(x, state)

    def initial_membrane(self, x):
        return self.initial_state(x)

    def forward(self, x):
        if self.step_mode == "m":
            return self.multi_step(x)
        if self.v is None or self.v[0].shape != x.shape:
            self.v = self.initial_state(x)
        s, self.v = self.update(x, self.v)
        return s

    def multi_step(self, x_seq):
        if self.surrogate is not None and hasattr(self.surrogate, "reset"):
            self.surrogate.reset()
        return self.step_loop(x_seq)


class IF(Neuron):
    """Integrate-and-fire: ``H[t] = V[t-1] + X[t]`` (no leak). The neuron of ANN->SNN conversion."""

    op_name = "snn.if"

    def charge(self, v, x):
        return v + x

    def attrs(self):
        return self.common_attrs()


class LIF(Neuron):
    """Leaky integrate-and-fire:

        H[t] = v_leak + decay * (V[t-1] - v_leak) + gain * X[t]

    Give ``decay`` directly (Wu 2019 / snntorch ``beta``) or ``tau`` with ``decay = 1 - 1/tau``
    (spikingjelly's discretisation); neither gives spikingjelly's default ``tau=2.0``. ``decay_input=True`` scales the input by ``gain = 1 - decay``
    (spikingjelly's ``decay_input``), else ``gain = 1``.
    """

    op_name = "snn.lif"

    def __init__(self, tau=None, decay=None, decay_input=False, v_leak=0.0, **kw):
        super().__init__(**kw)
        if tau is not None and decay is not None:
            raise ValueError("LIF: give one of tau= or decay=, not both")
        if tau is None and decay is None:
            tau = 2.0   # spikingjelly's LIFNode default
        if tau is not None:
            if tau <= 1.0:
                raise ValueError(f"LIF: tau={tau} must be > 1 (decay = 1 - 1/tau)")
            decay = 1.0 - 1.0 / float(tau)
        if isinstance(decay, torch.Tensor) and decay.numel() > 1:  # per neuron (snntorch's beta tensor)
            if not bool(((decay >= 0) & (decay <= 1)).all()):
                raise ValueError("LIF: every decay value must lie in [0, 1]")
            self.register_buffer("decay", decay.detach().float().clone())
        elif not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"LIF: decay={decay} must lie in [0, 1]")
        else:
            self.decay = float(decay)
        self.tau = None if tau is None else float(tau)
        self.decay_input = bool(decay_input)
        self.v_leak = float(v_leak)

    @property
    def gain(self):
        return 1.0 - self.decay if self.decay_input else 1.0

    def charge(self, v, x):
        if self.v_leak == 0.0:
            h = self.decay * v
        else:
            h = self.v_leak + self.decay * (v - self.v_leak)
        return h + (self.gain * x if self.decay_input else x)

    def attrs(self):
        a = {"tau": self.tau} if self.tau is not None else {"decay": self.decay}
        if self.decay_input:
            a["decay_input"] = True
        if self.v_leak != 0.0:
            a["v_leak"] = self.v_leak
        a.update(self.common_attrs())
        return a


class ParametricLIF(Neuron):
    """LIF with a trainable time constant (Fang 2021 PLIF, spikingjelly's ``ParametricLIFNode``):

        k = sigmoid(w),  H[t] = V[t-1] + k * (X[t] - (V[t-1] - v_leak))

    ``w`` is initialised to ``-log(init_tau - 1)`` so that ``k = 1/init_tau``.
    """

    op_name = "snn.plif"

    def __init__(self, init_tau=2.0, v_leak=0.0, **kw):
        super().__init__(**kw)
        if init_tau <= 1.0:
            raise ValueError(f"ParametricLIF: init_tau={init_tau} must be > 1")
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))
        self.v_leak = float(v_leak)

    @property
    def k(self):
        """``1 / tau = sigmoid(w)``: a 0-d tensor (trainable through ``w``)."""
        return self.w.sigmoid()

    def charge(self, v, x):
        return v + (x - (v - self.v_leak)) * self.k

    def attrs(self):
        a = {"tau": 1.0 / float(self.w.detach().sigmoid())}
        a.update(self.common_attrs())
        return a


class StateNeuron(Neuron):
    """Base of neurons whose state is several tensors (synaptic current + membrane, ...) or whose
    update is not charge / fire / reset on one membrane. Subclasses define
    ``init_state(x) -> tuple`` and ``update(x, state) -> (output, new_state, reported)``;
    ``reported`` is what ``output_state=True`` returns besides the output (the peer's own tuple,
    e.g. snntorch Synaptic's ``(spk, syn, mem)``). The multi-step form is the step loop over T."""

    op_name = "snn.state_neuron"

    def __init__(self, output_state=False, **kw):
        super().__init__(**kw)
        self.output_state = bool(output_state)
        self.state = None

    def charge(self, v, x):  # pragma: no cover - the update is ``update``
        raise NotImplementedError

    @abc.abstractmethod
    def init_state(self, x) -> tuple:
        """The state before step 0, for an input step shaped like ``x``."""

    @abc.abstractmethod
    def update(self, x, state):
        """One step: ``(output, new state, reported state)``."""

    def _result(self, out, reported):
        return (out, *reported) if self.output_state else out

    def forward(self, x):
        if self.step_mode == "m":
            return self.multi_step(x)
        if self.state is None or self.state[0].shape != x.shape:
            self.state = self.init_state(x)
        out, self.state, reported = self.update(x, self.state)
        return self._result(out, reported)

    def multi_step(self, x_seq):
        state = self.init_state(x_seq[0])
        outs, reps = [], []
        for t in range(x_seq.shape[0]):
            out, state, reported = self.update(x_seq[t], state)
            outs.append(out)
            reps.append(reported)
        if not self.output_state:
            return torch.stack(outs)
        return (torch.stack(outs), *[torch.stack([r[i] for r in reps]) for i in range(len(reps[0]))])

    def reset(self):
        super().reset()
        self.state = None

    def common_attrs(self) -> dict:
        a = super().common_attrs()
        if self.output_state:
            a["output_state"] = True
        return a


# --- op records: every stage learns these neurons from here ------------------------------------
# The TVM lowering calls the neuron's own ``charge`` on TIR expressions (plain arithmetic works on
# both), so a new neuron with an arithmetic ``charge`` needs no TVM code.
_TVM_NEURON = "snnc.targets.tvm_lower:_convert_neuron"
_NEURON = dict(spiking="yes", state=("v",), over_time="loop", accepts=seq_when_multi_step, shape=same_as_input)
register_op(Neuron, **_NEURON, refused={"onnx": "abstract base class"})
# "int": the constants (decay, gain, v_leak) of H = v_leak + decay (V - v_leak) + gain X that
# quantize_integer turns into integer arithmetic; "fused_scan": (decay, gain) of the training scan
register_op(IF, **_NEURON, hooks={"onnx": FORWARD, "tvm": _TVM_NEURON, "nir_out": FORWARD,
                                  "fused_scan": lambda n: (1.0, 1.0), "int": lambda n: (1.0, 1.0, 0.0)})
register_op(LIF, **_NEURON, hooks={"onnx": FORWARD, "tvm": _TVM_NEURON, "nir_out": FORWARD,
                                   "fused_scan": lambda n: (n.decay, n.gain),
                                   "int": lambda n: (n.decay, n.gain, n.v_leak)})
register_op(ParametricLIF, **_NEURON, hooks={
    "onnx": FORWARD, "tvm": _TVM_NEURON, "nir_out": FORWARD,
    "int": lambda n: (1.0 - float(n.k.detach()), float(n.k.detach()), n.v_leak)})
