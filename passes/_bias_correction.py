"""Bias correction for low-latency conversion (Li et al. 2021, "A free lunch from ANN: towards
efficient, accurate spiking neural networks calibration", ICML; light calibration pipeline).

At small T the rate code of layer l-1 is off by a systematic amount, which shifts the mean input
current of layer l away from the ANN's pre-activation. Layer by layer (so that each correction
sees the corrected layers before it), the per-channel mean of the time-averaged input current of
each IF over the calibration data is measured in the SNN at T steps and the difference to the
ANN's mean pre-activation is added to the bias of the conv/linear layer that produces it:

    b_l[c] += E[z_l^ANN[c]] / u_l[c] - E[(1/T) sum_t I_l[t][c]]       (u_l: the IF input's unit)
"""
from __future__ import annotations

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from snnc.ops import Neuron
from snnc.runtime import reset as reset_state

from . import _calibration as cal

_WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Linear)


def _producer(snn: fx.GraphModule, node: fx.Node):
    """The conv/linear whose bias shifts ``node``'s value by a per-channel constant, or None."""
    while node is not None and node.op == "call_module":
        mod = snn.get_submodule(node.target)
        if isinstance(mod, _WEIGHTED):
            return mod
        if not isinstance(mod, (nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
            return None
        node = node.args[0]
    if node is not None and node.op == "call_function" and "add" in getattr(node.target, "__name__", ""):
        for a in node.all_input_nodes:   # an add: shift one operand (the first one with a bias)
            p = _producer(snn, a)
            if p is not None:
                return p
    return None


def _channel_means(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(0, 1).reshape(x.shape[1], -1).mean(1) if x.dim() > 1 else x.mean().reshape(1)


def correct_biases(snn: fx.GraphModule, ann: fx.GraphModule, act_nodes, scales: dict, neurons: dict,
                   batches, T: int, burst: int = 1) -> None:
    """In place on ``snn``: ``act_nodes`` (of ``ann``), their ``scales`` and IF module names."""
    pre_nodes = [n.all_input_nodes[0] for n in act_nodes]
    pre = cal.record_activations(ann, batches, pre_nodes, desc="bias correction (ANN)")
    if_nodes = {n.target: n for n in snn.graph.nodes if n.op == "call_module"}
    for act in tqdm(act_nodes, desc="bias correction", disable=None, leave=False):
        if_node = if_nodes[neurons[act.name]]
        neuron = snn.get_submodule(if_node.target)
        producer = _producer(snn, if_node.args[0])
        if producer is None or not isinstance(neuron, Neuron):
            continue
        sums, count = 0.0, 0

        def hook(_m, args, _out):
            nonlocal sums, count
            sums = sums + _channel_means(args[0]) * len(args[0])
            count += len(args[0])

        h = neuron.register_forward_hook(hook)
        with torch.no_grad():
            for x in batches:
                reset_state(snn)
                for _ in range(T):
                    snn(x)
        h.remove()
        reset_state(snn)
        snn_mean = sums / count   # mean over samples, positions and the T steps
        unit = (torch.as_tensor(scales[act]) / burst / torch.as_tensor(neuron.v_th)).reshape(-1)
        ann_mean = pre[act.all_input_nodes[0]].mean(1) / unit
        delta = ann_mean - snn_mean
        out_ch = producer.weight.shape[0]
        if delta.numel() != out_ch:
            continue
        if producer.bias is None:
            producer.bias = nn.Parameter(torch.zeros(out_ch, dtype=producer.weight.dtype))
        producer.bias.data += delta.to(producer.bias.dtype)
