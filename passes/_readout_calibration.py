"""Readout calibration for low-latency conversion: fit the SNN's output layer to the ANN's logits on
the calibration inputs, after thresholds (and biases) are set -- calibrating on the SNN's outputs,
the last-layer step of Li et al. 2021's light calibration pipeline ("A free lunch from ANN"), done
in closed form.

Why: at small T the readout (the mean over T of the output layer's input current, Rueckauer 2017
§2.4) carries the rate-code errors of every layer below it -- the quantisation and unevenness errors
of Bu 2022 §3 -- which show as a per-class offset and a shrunk or stretched per-class scale of the
logits. ``_bias_correction.py`` matches the *mean* input of each IF layer; it cannot fix the
readout's scale, and its layer-by-layer T-step runs are what deep nets can least afford.

What: per class c, the least-squares fit ``z_c ~ a_c * y_c + b_c`` of the ANN logits z to the SNN
readout y over the calibration inputs. The readout is linear in the output layer's weights, so the
fit folds into that layer (``W[c] *= a_c``, ``bias[c] = a_c * bias[c] + b_c``): the graph's ops,
spikes and cost are unchanged.

Guard against over-fitting a few hundred inputs: the fit is made on the first half of the
calibration inputs and kept only if it lowers KL(ANN || SNN) of the softmax outputs on the second
half; then it is refitted on all of them. Deterministic for a given graph, data and T.
"""
from __future__ import annotations

import torch
from torch import fx, nn

from snnc.ops import Readout
from snnc.runtime import reset as reset_state

from ._bias_correction import _producer

MIN_SAMPLES = 8   # below it the held-out half cannot tell a fit from noise: not calibrated


def kl_to_ann(snn_logits: torch.Tensor, ann_logits: torch.Tensor) -> float:
    """Mean KL(softmax(ANN) || softmax(SNN)) per input: how much of the ANN's confidence the SNN keeps."""
    return float(torch.nn.functional.kl_div(snn_logits.log_softmax(-1), ann_logits.log_softmax(-1),
                                            log_target=True, reduction="batchmean"))


def _readout_layer(snn: fx.GraphModule):
    """The conv/linear whose output the membrane readout averages, or None."""
    for n in snn.graph.nodes:
        if n.op == "call_module" and isinstance(snn.get_submodule(n.target), Readout):
            return _producer(snn, n.args[0])
    return None


def _outputs(gm, batches, T=None) -> torch.Tensor:
    """Outputs of ``gm`` on ``batches``: the ANN once, or the per-step SNN after T steps from reset."""
    outs = []
    with torch.no_grad():
        for x in batches:
            if T is None:
                outs.append(gm(x))
                continue
            reset_state(gm)
            for _ in range(T):
                y = gm(x)
            outs.append(y)
    if T is not None:
        reset_state(gm)
    return torch.cat(outs)


def _fit(y: torch.Tensor, z: torch.Tensor):
    """Per-class ``(a, b)`` minimising sum_n (a y_n + b - z_n)^2; a = 1 where y does not vary."""
    ym, zm = y.mean(0), z.mean(0)
    var = ((y - ym) ** 2).mean(0)
    a = torch.where(var > 1e-12, ((y - ym) * (z - zm)).mean(0) / var.clamp(min=1e-12), torch.ones_like(var))
    return a, zm - a * ym


def calibrate_readout(snn: fx.GraphModule, ann: fx.GraphModule, batches, T: int) -> dict:
    """In place on the per-step ``snn``: fit its output layer to ``ann``'s logits after ``T`` steps.

    Returns ``{"applied": bool, "kl_held_out": [before, after] | None, "why": str}``; the graph is
    left unchanged unless ``applied``.
    """
    layer = _readout_layer(snn)
    if layer is None:
        return {"applied": False, "kl_held_out": None, "why": "no conv/linear layer feeds the membrane readout"}
    y, z = _outputs(snn, batches, T), _outputs(ann, batches)
    if y.dim() != 2 or y.shape != z.shape or layer.weight.shape[0] != y.shape[1]:
        return {"applied": False, "kl_held_out": None,
                "why": f"readout of shape {list(y.shape)} is not one value per output channel of the last layer"}
    if len(y) < MIN_SAMPLES:
        return {"applied": False, "kl_held_out": None, "why": f"fewer than {MIN_SAMPLES} calibration inputs"}
    h = len(y) // 2
    a, b = _fit(y[:h], z[:h])
    before, after = kl_to_ann(y[h:], z[h:]), kl_to_ann(a * y[h:] + b, z[h:])
    report = {"applied": after < before, "kl_held_out": [float(f"{before:.4g}"), float(f"{after:.4g}")]}
    if not report["applied"]:
        return {**report, "why": "the fit did not lower KL(ANN || SNN) on the held-out half"}
    a, b = _fit(y, z)
    with torch.no_grad():
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        layer.weight.mul_(a.reshape(shape).to(layer.weight.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], dtype=layer.weight.dtype))
        layer.bias.copy_(a * layer.bias + b)
    return {**report, "why": "lowered KL(ANN || SNN) on the held-out half"}
