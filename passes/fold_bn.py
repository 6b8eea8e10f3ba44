"""fold_bn: fold inference-mode BatchNorm into the conv / linear layer that feeds it.

Assumes: an ANN graph (any layout) in which every ``nn.BatchNorm1d/2d/3d`` node
reads the output of an ``nn.Conv1d/2d/3d`` / ``nn.Linear`` node that has no other
user, and every BN tracks running statistics. BN is folded with its running statistics, i.e.
the eval-mode semantics, whatever ``training`` flag the module carries (trace the ANN in
eval mode: tracing runs the model once, which in training mode updates the running statistics).

Guarantees: the BN nodes are gone; each producer's weights and bias become (per output channel
c, computed in float64 then rounded once)

    W'[c] = W[c] * g[c],   b'[c] = (b[c] - mu[c]) * g[c] + beta[c],   g = gamma / sqrt(var + eps)

(Ioffe & Szegedy 2015, eq. for inference; the standard step before ANN->SNN conversion,
Rueckauer 2017 §2.3). Outputs equal the eval-mode input graph to float32 rounding (tested
max abs diff <= 1e-5). A BN without a foldable predecessor (it reads a graph input, a
ReLU, a pooling layer, a conv with another user ...) is a ``SnncError`` naming both nodes.
The input graph is not modified.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from snnc.errors import SnncError, node_ref
from snnc.ir import annotate, graph_spec

_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _foldable_producer(gm: fx.GraphModule, bn_node: fx.Node) -> fx.Node:
    src = bn_node.args[0] if bn_node.args else None
    why = None
    if not isinstance(src, fx.Node):
        why = "its input is not a graph value"
    elif src.op != "call_module" or not isinstance(gm.get_submodule(src.target), _FOLDABLE):
        kind = type(gm.get_submodule(src.target)).__name__ if src.op == "call_module" else src.op
        why = f"its input {node_ref(src)} is a {kind}, not a Conv1d/Conv2d/Linear (or Conv3d)"
    elif len(src.users) != 1:
        others = ", ".join(f"%{u.name}" for u in src.users if u is not bn_node)
        why = f"its producer {node_ref(src)} also feeds {others}, so its weights cannot absorb the BN"
    if why:
        raise SnncError(f"fold_bn: cannot fold {node_ref(bn_node)}: {why}. Only BN directly after a "
                        "conv/linear layer (with no other user) can be folded")
    return src


def _fold_into(layer: nn.Module, bn: nn.Module, bn_node: fx.Node) -> None:
    if bn.running_mean is None or bn.running_var is None:
        raise SnncError(f"fold_bn: {node_ref(bn_node)} has track_running_stats=False: there are no "
                        "inference statistics to fold")
    out_ch = layer.weight.shape[0]
    if bn.num_features != out_ch:
        raise SnncError(f"fold_bn: {node_ref(bn_node)} normalises {bn.num_features} channels but its "
                        f"producer has {out_ch} outputs")
    w = layer.weight.detach().double()
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(mean)
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros_like(mean)
    g = gamma / torch.sqrt(var + bn.eps)
    dtype = layer.weight.dtype
    layer.weight = nn.Parameter((w * g.view(-1, *([1] * (w.dim() - 1)))).to(dtype))
    layer.bias = nn.Parameter(((bias - mean) * g + beta).to(dtype))


def fold_bn(gm: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of ``gm`` with every BatchNorm folded into its conv/linear producer."""
    out = copy.deepcopy(gm)
    out.snnc_spec = copy.deepcopy(graph_spec(gm))   # a plain attribute: deepcopy of a GraphModule drops it
    for node in list(out.graph.nodes):
        if node.op != "call_module" or not isinstance(out.get_submodule(node.target), _BN):
            continue
        src = _foldable_producer(out, node)
        _fold_into(out.get_submodule(src.target), out.get_submodule(node.target), node)
        node.replace_all_uses_with(src)
        out.graph.erase_node(node)
    out.graph.lint()
    out.recompile()
    out.delete_all_unused_submodules()
    return annotate(out)
