"""threshold_balance: ANN graph -> per-step SNN graph: every ReLU becomes an IF neuron whose
firing rate over T steps approximates the ReLU (clipped at a balanced scale lambda).

Assumes: a traced ANN graph with BatchNorm already folded (run ``fold_bn`` first), one input,
one output tensor (the logits, produced by a conv/linear layer), ReLU (module, function or
method) or ``snnc.ops.QCFS`` activations; average pooling, flatten/view, residual adds,
dropout, max pooling (``max_pool``, below).

Guarantees (per-step graph: run it T times, or ``unroll_timesteps(g, T)``):
  * an encoder after the input (``DirectEncoder``: the analog input as a constant current every
    step, Rueckauer 2017; or ``PoissonEncoder``: rate-coded spikes, Diehl 2015 / Rathi 2020)
    and a ``Readout("membrane")`` after the last layer, which accumulates its input current and
    never fires (its mean over T estimates the ANN's logits; Rueckauer 2017 §2.4);
  * each activation becomes ``IF(v_th, reset, v_init = v_init_fraction * v_th)``; dropout is
    removed; the input graph is not modified;
  * **weights are scaled, not thresholds** (Rueckauer 2017 eq. 7-8): the layer producing an IF's
    input is divided by lambda_l and the layer reading its spikes multiplied by lambda_l, so
    v_th = 1 -- except where a residual add brings in spikes no layer can rescale; that IF gets
    v_th = lambda_l / lambda_skip (a float, or a [C, 1, 1] tensor when channel-wise, and then
    v_init = v_init_fraction * v_th per channel too).
    See ``passes/_snn_builder.py``. With direct input, the rate of an IF at large T is
    clamp(a / lambda, 0, 1) up to 1/T, so the readout reproduces the ANN when lambda >= max(a).

Scales lambda (times ``scale``), from the calibration data (tqdm progress bar):
  * ``"max"``: the max activation (Diehl 2015, data-based normalisation);
  * ``"percentile"``: the ``q``-th percentile of the positive activations (Rueckauer 2017, 99.9);
  * ``"mse"``: the clip value minimising the error of a ``T_target``-step rate code with
    half-threshold start (threshold search of Li 2021 with the quantiser of Bu 2022); low latency;
  * ``"spiking"``: Rathi 2020 / Sengupta 2019 layer-by-layer balancing: layer l's lambda is the
    max input current it receives over ``T_calib`` steps in the SNN converted up to layer l-1,
    driven by the chosen encoding (Poisson in the papers); ``scale=0.7`` is Rathi's factor.
    The first layer with direct input gets exactly the max scale; deeper layers get *larger*
    scales than "max" (one step's current from bursty spikes exceeds its time average), which
    is why the papers scale them down and need long T;
  * ``"qcfs"``: the trained thresholds of ``QCFS`` activations (Bu 2022), no calibration.
``channel_wise=True`` gives one lambda per channel (max / percentile / mse / spiking).
``v_init_fraction`` (default 0.5 for "mse" and "qcfs", else 0) starts membranes at a fraction of
the threshold: 0.5 centres the rate-code rounding error (Bu 2022 Theorem 2).
``max_pool``: a MaxPool2d on converted values becomes ``snnc.ops.SpikeMaxPool2d``:
``"lateral"`` (default; lateral-inhibition pooling, Li 2022: the output's spike count is exactly
the max of the input counts, so accuracy rises with T), ``"gate"`` (Rueckauer 2017 §2.4: pass the
spikes of the input with the highest count so far); ``"spikes"`` keeps a per-step max of the
spikes (an OR of the trains: over-estimates the rate, increasingly with T); ``"refuse"`` raises.
``bias_correction=True`` then shifts each layer's bias so that the mean input current of every IF
over ``T_target`` steps matches the ANN's mean pre-activation (Li 2021; ``_bias_correction.py``).
``readout_calibration=True`` last fits the output layer per class (scale and offset, least squares)
so that the SNN's readout after ``T_target`` steps matches the ANN's logits on the calibration data,
kept only if it lowers KL(ANN || SNN) on a held-out half (``_readout_calibration.py``).
``burst=k`` (default 1) makes every activation a ``BurstIF`` that sends up to k spikes per step
(Li & Zeng 2022): each spike is worth lambda / k, so T steps carry T k + 1 levels and the "mse"
scales are tuned for ``T_target * k`` levels; spikes are then counts 0..k, not 0/1.
"""
from __future__ import annotations

import copy

import torch
from torch import fx
from tqdm.auto import tqdm

from snnc.errors import InputError, SnncError
from snnc.ir import annotate, graph_spec
from snnc.runtime import reset as reset_state
from snnc.ops.qcfs import QCFS

from . import _calibration as cal
from ._bias_correction import correct_biases
from ._readout_calibration import calibrate_readout
from ._snn_builder import RECORD, Builder, is_activation

METHODS = ("max", "percentile", "mse", "spiking", "qcfs")
RESETS = ("subtract", "zero")
ENCODINGS = ("direct", "poisson")
MAX_POOLS = ("lateral", "gate", "spikes", "refuse")


def _check_options(method, q, reset, encoding, T_calib, scale, v_init_fraction, max_pool, T_target, burst=1):
    if method not in METHODS:
        raise InputError(f"threshold_balance: method={method!r}; expected one of {METHODS}")
    if reset not in RESETS:
        raise InputError(f"threshold_balance: reset={reset!r}; expected one of {RESETS}")
    if encoding not in ENCODINGS:
        raise InputError(f"threshold_balance: encoding={encoding!r}; expected one of {ENCODINGS}")
    if not 0 < q <= 100:
        raise InputError(f"threshold_balance: q={q} must be in (0, 100]")
    if not scale > 0:
        raise InputError(f"threshold_balance: scale={scale} must be > 0")
    if not 0 <= v_init_fraction < 1:
        raise InputError(f"threshold_balance: v_init_fraction={v_init_fraction} must be in [0, 1)")
    if max_pool not in MAX_POOLS:
        raise InputError(f"threshold_balance: max_pool={max_pool!r}; expected one of {MAX_POOLS}")
    if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
        raise InputError(f"threshold_balance: burst={burst!r} must be an int >= 1 (spikes per step)")
    if burst > 1 and reset != "subtract":
        raise InputError(f"threshold_balance: burst={burst} needs reset='subtract' (got {reset!r})")
    for name, v in (("T_calib", T_calib), ("T_target", T_target)):
        if not isinstance(v, int) or v < 1:
            raise InputError(f"threshold_balance: {name}={v!r} must be a positive int")


def _ann_scales(gm, nodes, batches, method, q, channel_wise, T_target):
    acts = cal.record_activations(gm, batches, nodes, desc=f"calibrating ({method})")
    out = {}
    for n in nodes:
        s = cal.fill_dead(cal.reduce_scales(acts[n], method, q, channel_wise, T_target))
        out[n] = cal.shape_scale(s, n)
    return out


def _spiking_scales(gm, nodes, batches, channel_wise, T_calib, scale, opts):
    """Rathi 2020 Alg. 1 / Sengupta 2019: balance layer by layer on the partially converted SNN."""
    scales = {}
    bar = tqdm(total=len(nodes) * len(batches), desc="spiking balancing", disable=None, leave=False)
    for n in nodes:
        b = Builder(gm, {**scales, n.name: RECORD}, opts)
        snn = b.build()
        rec_name, unit = b.recorders[n.name]
        peak = []

        def hook(_m, args, _out):
            cur = args[0] * unit                      # input current in ANN units
            c = cur.transpose(0, 1).reshape(cur.shape[1], -1) if channel_wise else cur.reshape(1, -1)
            peak.append(c.max(dim=1).values)

        h = snn.get_submodule(rec_name).register_forward_hook(hook)
        with torch.no_grad():
            for x in batches:
                reset_state(snn)
                for _ in range(T_calib):
                    snn(x)
                bar.update()
        h.remove()
        reset_state(snn)
        s = torch.stack(peak).max(dim=0).values.clamp(min=0)
        scales[n] = cal.shape_scale(cal.fill_dead(s * scale), n)
    bar.close()
    return scales


def _prepare(gm, calib, method, batch_size):
    spec = graph_spec(gm)
    if spec.get("T") or spec.get("layout") != "step":
        raise SnncError("threshold_balance: expects a per-step ANN graph (snnc.trace of the ANN); this "
                        f"graph has layout={spec.get('layout')!r}, T={spec.get('T')}")
    if len(spec["inputs"]) != 1:
        raise SnncError(f"threshold_balance: the graph has {len(spec['inputs'])} inputs; one is supported")
    ann = copy.deepcopy(gm)
    ann.snnc_spec = copy.deepcopy(spec)
    annotate(ann)
    nodes = [n for n in ann.graph.nodes if is_activation(ann, n)]
    qcfs = [n for n in nodes if n.op == "call_module" and isinstance(ann.get_submodule(n.target), QCFS)]
    if method == "qcfs" and len(qcfs) != len(nodes):
        raise SnncError("threshold_balance: method='qcfs' needs every activation to be snnc.ops.QCFS "
                        f"({len(nodes) - len(qcfs)} are ReLUs); train the ANN with snnc.ops.use_qcfs(model)")
    batches = None if method == "qcfs" and calib is None else cal.calibration_batches(calib, batch_size)
    sample = tuple(spec["inputs"][0][0][1:])
    if batches is not None and any(tuple(b.shape[1:]) != sample for b in batches):
        bad = next(tuple(b.shape) for b in batches if tuple(b.shape[1:]) != sample)
        raise InputError(f"threshold_balance: calibration batch of shape {list(bad)} does not match the "
                         f"graph's input [N, {', '.join(map(str, sample))}]")
    return ann, nodes, batches


def balance(gm: fx.GraphModule, calib=None, method: str = "percentile", q: float = 99.9,
            channel_wise: bool = False, reset: str = "subtract", encoding: str = "direct",
            T_calib: int = 32, scale: float = 1.0, v_init_fraction: float | None = None,
            max_pool: str = "lateral", T_target: int = 4, seed: int = 0, batch_size: int = 256,
            bias_correction: bool = False, burst: int = 1, readout_calibration: bool = False):
    """``(snn_graph, scales)``: what ``threshold_balance`` computes, plus the lambda of every
    converted activation (``{ann node name: tensor}``, 0-dim or per channel ``[C, 1, 1]``)."""
    if v_init_fraction is None:
        v_init_fraction = 0.5 if method in ("mse", "qcfs") else 0.0
    _check_options(method, q, reset, encoding, T_calib, scale, v_init_fraction, max_pool, T_target, burst)
    ann, nodes, batches = _prepare(gm, calib, method, batch_size)
    signed = batches is not None and any(bool((b < 0).any()) for b in batches)
    opts = {"reset": reset, "v_init_fraction": v_init_fraction, "encoding": encoding, "seed": seed,
            "signed": signed, "max_pool": max_pool, "burst": burst}
    if method == "qcfs":
        scales = {n: ann.get_submodule(n.target).threshold.detach().abs().reshape(()) * scale for n in nodes}
    elif method == "spiking":
        scales = _spiking_scales(ann, nodes, batches, channel_wise, T_calib, scale, opts)
    else:
        scales = {n: s * scale for n, s in
                  _ann_scales(ann, nodes, batches, method, q, channel_wise, T_target * burst).items()}
    cal.check_scales(scales)
    builder = Builder(ann, scales, opts)
    snn = builder.build()
    if bias_correction:
        if batches is None:
            raise InputError("threshold_balance: bias_correction=True needs calibration data")
        correct_biases(snn, ann, nodes, scales, builder.neurons, batches, T_target, burst)
    if readout_calibration:
        if batches is None:
            raise InputError("threshold_balance: readout_calibration=True needs calibration data")
        calibrate_readout(snn, ann, batches, T_target)
    return snn, {n.name: s for n, s in scales.items()}


def threshold_balance(gm: fx.GraphModule, calib=None, method: str = "percentile", q: float = 99.9,
                      channel_wise: bool = False, reset: str = "subtract", encoding: str = "direct",
                      T_calib: int = 32, scale: float = 1.0, v_init_fraction: float | None = None,
                      max_pool: str = "lateral", T_target: int = 4, seed: int = 0,
                      batch_size: int = 256, bias_correction: bool = False, burst: int = 1,
                      readout_calibration: bool = False) -> fx.GraphModule:
    """Convert BN-folded ANN graph ``gm`` into a per-step SNN graph (see the module docstring).

    ``calib``: calibration inputs, a tensor ``[N, ...]`` or an iterable of batches (tensors or
    ``(x, y)`` tuples); not needed for ``method="qcfs"``. ``balance(...)`` takes the same
    arguments and also returns the scales.
    """
    return balance(gm, calib, method=method, q=q, channel_wise=channel_wise, reset=reset,
                   encoding=encoding, T_calib=T_calib, scale=scale, v_init_fraction=v_init_fraction,
                   max_pool=max_pool, T_target=T_target, seed=seed, batch_size=batch_size,
                   bias_correction=bias_correction, burst=burst, readout_calibration=readout_calibration)[0]
