"""fold_tdbn: fold threshold-dependent batch norm into the preceding convolution (Zheng 2021).

Assumes: a spiking-IR graph (per-step or unrolled) whose ``snn.tdbn`` nodes use their running
statistics, i.e. the graph is used for inference. A tdBN folds when its input is an
``nn.Conv2d`` whose output feeds nothing else (possibly through ``time.merge``/``time.split``,
which commute with a per-channel affine map on the merged batch).

Guarantees: each folded pair becomes one convolution with (Zheng 2021, Sec. 4.2)

    W' = λ α V_th W / sqrt(σ² + ε),     B' = λ α V_th (B - μ) / sqrt(σ² + ε) + β

and the tdBN node disappears; outputs equal the unfolded graph up to float rounding (tested
≤ 1e-5). A tdBN that does not follow a foldable conv is left in place (it is still a correct
per-channel affine op at inference). The input graph is not modified.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from snnc.ir import annotate, graph_spec
from snnc.ops import MergeTime, SplitTime, TDBatchNorm


def _module(gm, node):
    return gm.get_submodule(node.target) if node.op == "call_module" else None


def _producing_conv(gm, node):
    """The conv node feeding ``node`` through layout changes only, if no one else uses its value."""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    while src is not None and len(src.users) == 1 and isinstance(_module(gm, src), (MergeTime, SplitTime)):
        src = src.args[0]
    if src is None or len(src.users) != 1 or not isinstance(_module(gm, src), nn.Conv2d):
        return None
    return src


@torch.no_grad()
def _fold_into(conv: nn.Conv2d, bn: TDBatchNorm):
    factor = bn.weight * bn.scale / torch.sqrt(bn.running_var + bn.eps)      # λ α V_th / sqrt(σ²+ε)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * factor + bn.bias
    conv.weight.mul_(factor.view(-1, 1, 1, 1))
    conv.bias = nn.Parameter(new_bias)


def fold_tdbn(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of ``gm`` with every foldable conv → tdBN pair replaced by one conv."""
    out = copy.deepcopy(gm)
    for node in list(out.graph.nodes):
        bn = _module(out, node)
        if not isinstance(bn, TDBatchNorm):
            continue
        conv_node = _producing_conv(out, node)
        if conv_node is None:
            continue
        conv = _module(out, conv_node)
        if conv.out_channels != bn.num_features:
            continue
        _fold_into(conv, bn)
        node.replace_all_uses_with(node.args[0])
        out.graph.erase_node(node)
    out.graph.lint()
    out.recompile()
    out.delete_all_unused_submodules()
    out.snnc_spec = dict(graph_spec(gm))
    return annotate(out)
