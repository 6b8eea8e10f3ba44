"""Encoders (input -> spikes or currents over time) and readouts (time -> per-sample output).

Layouts: single-step (``step_mode="s"``) ops see one step ``[N, ...]`` per call; multi-step
(``step_mode="m"``) encoders map a static ``[N, ...]`` to ``[T, N, ...]`` and readouts map
``[T, N, ...]`` to ``[N, ...]``.
"""
from __future__ import annotations

import torch
from torch import nn

from .registry import FORWARD, register_op, seq_when_multi_step


class DirectEncoder(nn.Module):
    """Constant-current coding: ``X[t] = x`` for every t (the analog input drives the first layer
    each step, Rueckauer 2017). Multi-step: ``[N, ...] -> [T, N, ...]`` (a broadcast view)."""

    op_name = "snn.direct_encoder"

    def __init__(self, T=None, step_mode="s"):
        super().__init__()
        self.T = T
        self.step_mode = step_mode

    def forward(self, x):
        if self.step_mode == "s":
            return x
        return x.unsqueeze(0).expand(self.T, *x.shape)

    def reset(self):
        pass

    def attrs(self):
        return {"T": self.T} if self.step_mode == "m" else {}


class PoissonEncoder(nn.Module):
    """Rate coding: ``S[t] ~ Bernoulli(clamp(|x|, 0, 1))``; with ``signed=True`` the spike carries
    ``sign(x)`` (Rathi 2020's signed Poisson input for inputs normalised to [-1, 1]).

    Randomness comes from a ``torch.Generator`` seeded with ``seed``; it is created on first use
    and re-seeded by ``reset()``, so a reset model replays the same spike trains. Single-step and
    multi-step forms draw the same numbers: step t draws ``rand(x.shape)`` in both.
    """

    op_name = "snn.poisson_encoder"

    def __init__(self, seed=0, signed=False, T=None, step_mode="s"):
        super().__init__()
        self.seed = int(seed)
        self.signed = bool(signed)
        self.T = T
        self.step_mode = step_mode
        self._gen = None

    def _generator(self, device):
        if self._gen is None or self._gen.device != torch.device(device):
            self._gen = torch.Generator(device=device)
            self._gen.manual_seed(self.seed)
        return self._gen

    def _draw(self, x, gen):
        p = x.abs().clamp(0.0, 1.0) if self.signed else x.clamp(0.0, 1.0)
        s = (torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype) < p).to(x.dtype)
        return s * torch.sign(x) if self.signed else s

    def forward(self, x):
        gen = self._generator(x.device)
        if self.step_mode == "s":
            return self._draw(x, gen)
        return torch.stack([self._draw(x, gen) for _ in range(self.T)])

    def reset(self):
        self._gen = None

    def __getstate__(self):  # a Generator does not pickle; it is re-created from the seed
        state = self.__dict__.copy()
        state["_gen"] = None
        return state

    def attrs(self):
        a = {"seed": self.seed}
        if self.signed:
            a["signed"] = True
        if self.step_mode == "m":
            a["T"] = self.T
        return a


class Readout(nn.Module):
    """Time-averaged output: ``y = (1/T) * sum_t X[t]``.

    ``mode="spike_count"``: X are spikes, y is the firing rate (Wu 2019's spike-count readout).
    ``mode="membrane"``: X is the input current of a non-spiking output layer that only
    accumulates (Rathi 2020; Rueckauer 2017); dividing by T keeps y on the ANN's logit scale.
    Single-step: keeps a running sum and returns the mean over the steps seen so far, so the
    output after step T equals the multi-step output.
    """

    op_name = "snn.readout"
    MODES = ("spike_count", "membrane")

    def __init__(self, mode="membrane", step_mode="s"):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Readout mode={mode!r}: expected one of {self.MODES}")
        self.mode = mode
        self.step_mode = step_mode
        self.acc = None
        self.steps = 0

    def forward(self, x):
        if self.step_mode == "m":
            acc = x[0]
            for t in range(1, x.shape[0]):  # sequential sum: the same rounding as the single-step form
                acc = acc + x[t]
            return acc / x.shape[0]
        self.acc = x.clone() if self.acc is None else self.acc + x
        self.steps += 1
        return self.acc / self.steps

    def reset(self):
        self.acc = None
        self.steps = 0

    def attrs(self):
        return {"mode": self.mode}


class MergeTime(nn.Module):
    """``[T, N, ...] -> [T*N, ...]``: stateless layers run once on the time-flattened batch."""

    op_name = "time.merge"

    def forward(self, x):
        return x.flatten(0, 1)

    def attrs(self):
        return {}


class SplitTime(nn.Module):
    """``[T*N, ...] -> [T, N, ...]``: back to the time-major layout neurons iterate over."""

    op_name = "time.split"

    def __init__(self, T):
        super().__init__()
        self.T = int(T)

    def forward(self, x):
        return x.unflatten(0, (self.T, x.shape[0] // self.T))

    def attrs(self):
        return {"T": self.T}


# --- op records ---------------------------------------------------------------------------------
def _seq_if_multi_step(mod, layouts):
    return "seq" if mod.step_mode == "m" else (layouts[0] if layouts else "step")


def _encoded_shape(mod, ins):
    (shape, dtype), = ins[:1]
    return ((mod.T, *shape), dtype) if mod.step_mode == "m" else (shape, dtype)


def _readout_shape(mod, ins):
    shape, dtype = ins[0]
    return (shape[1:], dtype) if mod.step_mode == "m" else (shape, dtype)


_TVM = "snnc.targets.tvm_lower:"
register_op(DirectEncoder, spiking="keep", over_time="encode", layout=_seq_if_multi_step, shape=_encoded_shape,
            hooks={"onnx": FORWARD, "tvm": _TVM + "_convert_direct_encoder", "nir_out": FORWARD,
                   "tvm:int": "snnc.targets.tvm_int_lower:_emit_broadcast"})
register_op(PoissonEncoder, spiking="yes", over_time="encode", state=("generator",), layout=_seq_if_multi_step,
            shape=_encoded_shape,
            refused={"onnx": "torch's random stream cannot be reproduced in ONNX; feed encoded spikes as "
                             "the input instead"})
register_op(Readout, spiking="no", state=("acc",), over_time="loop", accepts=seq_when_multi_step,
            shape=_readout_shape,
            layout=lambda m, ls: "step" if m.step_mode == "m" else (ls[0] if ls else "step"),
            hooks={"onnx": FORWARD, "tvm": _TVM + "_convert_readout"},
            refused={"nir_out": "NIR has no time axis; to_nir ends the graph before a final readout, with a note"})
register_op(MergeTime, spiking="keep", accepts=lambda m: {"seq"}, layout=lambda m, ls: "flat",
            hooks={"onnx": FORWARD, "tvm": _TVM + "_convert_reshape", "nir_out": FORWARD,
                   "tvm:int": "snnc.targets.tvm_int_lower:_emit_view"})
register_op(SplitTime, spiking="keep", accepts=lambda m: {"flat"}, layout=lambda m, ls: "seq",
            hooks={"onnx": FORWARD, "tvm": _TVM + "_convert_reshape", "nir_out": FORWARD,
                   "tvm:int": "snnc.targets.tvm_int_lower:_emit_view"})
