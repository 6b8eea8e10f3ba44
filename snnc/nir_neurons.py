"""NIR neuron nodes -> snnc neurons (the discretisation half of ``snnc/nir.py``).

Every mapping is one forward-Euler step of length ``dt`` (see ``snnc/nir.py`` and
``snnc/ops/cuba.py`` for the equations). Each function returns ``(module, input_gain)``:
``input_gain`` is ``None`` or the per-neuron factor the input must be multiplied by first.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import SnncError, UnsupportedOp
from .ops import IF, LIF, CurrentLI, CurrentLIF, Delay, ParametricLIF


def arr(v) -> np.ndarray:
    return np.asarray(v, dtype=np.float64) if not isinstance(v, np.ndarray) else v.astype(np.float64)


def uniform(name, what, values: np.ndarray) -> float:
    if values.size and not np.all(values == values.flat[0]):
        raise UnsupportedOp(f"NIR node '{name}': per-neuron {what} values differ "
                            f"(min {values.min():g}, max {values.max():g}); snnc neurons take one {what}")
    return float(values.flat[0]) if values.size else 0.0


def threshold_value(v_th: np.ndarray):
    """A float if all neurons share it, ``[C,1,1]`` if it only varies by channel, else the array."""
    v_th = np.asarray(v_th, dtype=np.float32)
    if v_th.size == 0 or np.all(v_th == v_th.flat[0]):
        return float(v_th.flat[0]) if v_th.size else 1.0
    if v_th.ndim == 3 and np.all(v_th == v_th[:, :1, :1]):
        return torch.from_numpy(v_th[:, :1, :1].copy())
    return torch.from_numpy(v_th.copy())


def _neuron_kwargs(meta: dict) -> dict:
    """The snnc-only neuron options ``to_nir`` wrote into the metadata (else NIR's own)."""
    kw = {"reset": meta.get("reset", "zero"), "compare": meta.get("compare", ">")}
    if "v_init" in meta:
        kw["v_init"] = float(meta["v_init"])
    return kw


def input_gain(gain: np.ndarray, one: float):
    """The factor to multiply the input by before a neuron whose own gain is ``one``, or ``None``
    when every neuron's ``gain`` equals it (up to the float32 rounding of the NIR file)."""
    return None if np.allclose(gain, one, rtol=1e-6, atol=0.0) else gain / one


def _need_dt(name, kind, dt):
    if dt is None:
        raise SnncError(f"NIR node '{name}' ({kind}) has a time constant: pass dt= (the simulation step, in "
                        "the unit of tau) to snnc.from_nir (--dt on the command line)")


def _decay(name, kind, what, tau, dt) -> float:
    """``1 - dt/tau`` for a uniform ``tau`` (forward Euler needs tau >= dt)."""
    t = uniform(name, what, arr(tau))
    if not t >= dt:
        raise UnsupportedOp(f"NIR node '{name}' ({kind}): {what}={t:g} < dt={dt:g}; forward Euler needs {what} >= dt")
    return 1.0 - dt / t


def if_node(name, node, dt, meta):
    """IF: forward Euler of dv/dt = r I is H = V + (dt r) X; dt defaults to 1 for graphs
    without time constants (sinabs writes r = 1 meaning one input per step; spikingjelly writes
    r = 1/dt)."""
    v_reset = uniform(name, "v_reset", arr(node.v_reset))
    m = IF(v_th=threshold_value(node.v_threshold), v_reset=v_reset, **_neuron_kwargs(meta))
    if meta.get("snnc_op") == "snn.if":
        return m, None
    return m, input_gain((1.0 if dt is None else dt) * arr(node.r), 1.0)


def lif_node(name, node, dt, meta):
    v_th = threshold_value(node.v_threshold)
    kw = dict(v_reset=uniform(name, "v_reset", arr(node.v_reset)), **_neuron_kwargs(meta))
    op = meta.get("snnc_op")
    if op == "snn.plif":  # written by to_nir: w restores the trainable time constant exactly
        m = ParametricLIF(v_leak=float(meta.get("v_leak", 0.0)), v_th=v_th, **kw)
        with torch.no_grad():
            m.w.fill_(float(meta["w"]))
        return m, None
    if op == "snn.lif":
        lif_kw = {"tau": float(meta["tau"])} if "tau" in meta else {"decay": float(meta["decay"])}
        m = LIF(decay_input=bool(meta.get("decay_input", False)), v_leak=float(meta.get("v_leak", 0.0)),
                v_th=v_th, **lif_kw, **kw)
        return m, None
    _need_dt(name, "LIF", dt)
    tau = uniform(name, "tau", arr(node.tau))
    if not tau > dt:
        raise UnsupportedOp(f"NIR node '{name}' (LIF): tau={tau:g} <= dt={dt:g}; forward Euler needs tau > dt")
    decay, gain = 1.0 - dt / tau, arr(node.r) * dt / tau
    v_leak = uniform(name, "v_leak", arr(node.v_leak))
    if input_gain(gain, dt / tau) is None:      # r = 1: spikingjelly's decay_input form
        return LIF(decay=decay, decay_input=True, v_leak=v_leak, v_th=v_th, **kw), None
    m = LIF(decay=decay, v_leak=v_leak, v_th=v_th, **kw)  # gain 1 (snntorch's r = tau/dt), else scale
    return m, input_gain(gain, 1.0)


def _two_state(name, kind, node, dt, meta, tau_syn, w_in):
    """``(alpha, beta, gain_in * gain, v_leak)`` of a current-based node; the two gains multiply
    (the current is linear in X), so a per-neuron product becomes one input scale."""
    if "alpha" in meta:   # written by to_nir: the exact snnc constants
        return (float(meta["alpha"]), float(meta["beta"]), float(meta.get("gain_in", 1.0)) * float(meta.get("gain", 1.0)),
                float(meta.get("v_leak", 0.0)))
    _need_dt(name, kind, dt)
    tau_mem = node.tau_mem if hasattr(node, "tau_mem") else node.tau
    beta = _decay(name, kind, "tau_mem" if hasattr(node, "tau_mem") else "tau", tau_mem, dt) \
        if tau_mem is not None else 1.0
    if tau_syn is None:                                   # LI / I: the input is the current
        alpha, g_in = 0.0, 1.0
    else:
        alpha = _decay(name, kind, "tau_syn", tau_syn, dt)
        g_in = arr(w_in) * dt / arr(tau_syn)
    g_mem = arr(node.r) * (dt / arr(tau_mem) if tau_mem is not None else dt)
    return alpha, beta, arr(g_in) * g_mem, uniform(name, "v_leak", arr(getattr(node, "v_leak", 0.0)))


def _split_gain(gain):
    """A uniform gain goes into the neuron (``gain_in``); per-neuron gains become an input scale."""
    g = input_gain(np.asarray(gain, dtype=np.float64), 1.0)
    if g is None:
        return 1.0, None
    if np.all(g == g.flat[0]):
        return float(g.flat[0]), None
    return 1.0, g


def _euler(m, meta):
    """A neuron ``to_nir`` wrote in norse's Euler form: its exact float32 constants."""
    m.form, m.current = "euler", bool(meta.get("current", True))
    m.k_syn, m.k_mem = float(meta["k_syn"]), float(meta["k_mem"])
    return m, None


def cuba_lif_node(name, node, dt, meta):
    if meta.get("form") == "euler":
        return _euler(CurrentLIF(alpha=float(meta["alpha"]), beta=float(meta["beta"]), gain=float(meta["gain"]),
                                 v_leak=float(meta.get("v_leak", 0.0)), v_th=threshold_value(node.v_threshold),
                                 v_reset=uniform(name, "v_reset", arr(node.v_reset)),
                                 v_init=float(meta.get("v_init", meta.get("v_leak", 0.0))),
                                 **{k: v for k, v in _neuron_kwargs(meta).items() if k != "v_init"}), meta)
    alpha, beta, gain, v_leak = _two_state(name, "CubaLIF", node, dt, meta, node.tau_syn, node.w_in)
    g, scale = _split_gain(gain)
    kw = _neuron_kwargs(meta)
    if "v_init" not in kw:
        kw["v_init"] = v_leak
    return CurrentLIF(alpha=alpha, beta=beta, gain_in=g, v_leak=v_leak, v_th=threshold_value(node.v_threshold),
                      v_reset=uniform(name, "v_reset", arr(node.v_reset)), **kw), scale


def li_node(name, node, dt, meta):
    kind = type(node).__name__
    if meta.get("form") == "euler":
        v_leak = float(meta.get("v_leak", 0.0))
        return _euler(CurrentLI(alpha=float(meta["alpha"]), beta=float(meta["beta"]), gain=float(meta["gain"]),
                                v_leak=v_leak, v_init=float(meta.get("v_init", v_leak))), meta)
    if kind == "I":   # dv/dt = r I: no leak, beta = 1
        if "alpha" in meta:
            alpha, beta, gain, v_leak = _two_state(name, kind, node, dt, meta, None, None)
        else:
            alpha, beta, v_leak = 0.0, 1.0, 0.0
            gain = arr(node.r) * (1.0 if dt is None else dt)
    else:
        tau_syn = getattr(node, "tau_syn", None)
        alpha, beta, gain, v_leak = _two_state(name, kind, node, dt, meta, tau_syn, getattr(node, "w_in", 1.0))
    g, scale = _split_gain(gain)
    v_init = float(meta["v_init"]) if "v_init" in meta else v_leak
    return CurrentLI(alpha=alpha, beta=beta, gain_in=g, v_leak=v_leak, v_init=v_init), scale


def delay_node(name, node, dt, meta):
    d = uniform(name, "delay", arr(node.delay)) / (1.0 if dt is None else dt)
    if abs(d - round(d)) > 1e-6 * max(1.0, abs(d)) or d < 0:
        raise UnsupportedOp(f"NIR node '{name}' (Delay): delay / dt = {d:g} is not a whole number of steps")
    return Delay(int(round(d))), None


def meta(node) -> dict:
    """Node metadata with h5py's bytes/0-d arrays turned into plain Python values."""
    out = {}
    for k, v in (getattr(node, "metadata", None) or {}).items():
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, np.ndarray) and v.ndim == 0:
            v = v.item()
        elif isinstance(v, np.generic):
            v = v.item()
        out[k] = v
    return out


def foreign_semantics(g, nir) -> list[str]:
    """Warnings, by node, for nodes whose writer runs them otherwise than NIR's equations say.

    * IF nodes at NIR's defaults (r = 1, v_reset = 0): sinabs writes its IAF layers this way and runs
      them with MultiSpike / MembraneSubtract by default (several spikes per step, reset by
      subtraction); NIR's IF fires at most once per step and resets to v_reset.
    * LIF / CubaLIF nodes with r = tau_mem / 1e-4 (and w_in = tau_syn / 1e-4): snntorch's
      ``export_to_nir`` writes Leaky / Synaptic this way (its fixed dt = 1e-4) and snntorch resets
      by subtraction one step late by default (``reset="subtract_after_leak"`` here)."""
    if meta(g).get("writer") == "snnc":
        return []
    key = lambda k: (len(k), k)
    ifs, snt = [], []
    for k, n in g.nodes.items():
        if "snnc_op" in meta(n) or "alpha" in meta(n):
            continue
        if isinstance(n, nir.IF) and np.all(np.asarray(n.r) == 1) and np.all(np.asarray(n.v_reset) == 0):
            ifs.append(k)
        tau = getattr(n, "tau_mem", getattr(n, "tau", None))
        if isinstance(n, (nir.LIF, nir.CubaLIF)) and np.allclose(np.asarray(n.r), np.asarray(tau) / 1e-4, rtol=1e-5) \
                and (not isinstance(n, nir.CubaLIF) or np.allclose(np.asarray(n.w_in), np.asarray(n.tau_syn) / 1e-4, rtol=1e-5)):
            snt.append(k)
    out = []
    if ifs:
        out.append(f"NIR nodes {', '.join(sorted(ifs, key=key))} (IF with r=1, v_reset=0, as sinabs writes its IAF "
                   "layers): snnc runs NIR's IF (at most one spike per step, reset to v_reset). sinabs runs its IAF "
                   "with MultiSpike and MembraneSubtract by default (several spikes per step, reset by subtraction); "
                   "if this graph came from such a model, snnc's spikes differ wherever the membrane exceeds the "
                   "threshold by more than it")
    if snt:
        out.append(f"NIR nodes {', '.join(sorted(snt, key=key))} (LIF/CubaLIF with r = tau/1e-4, as "
                   "snntorch.export_to_nir writes Leaky/Synaptic): snnc runs NIR's reset to v_reset at the spike; "
                   "snntorch's default resets by subtraction one step late: pass reset='subtract_after_leak' "
                   "to follow it")
    return out


def mappings(nir):
    """NIR node class -> mapping function, for the classes this ``nir`` release has."""
    out = {nir.IF: if_node, nir.LIF: lif_node, nir.CubaLIF: cuba_lif_node, nir.LI: li_node, nir.I: li_node,
           nir.Delay: delay_node}
    if hasattr(nir, "CubaLI"):
        out[nir.CubaLI] = li_node
    return out
