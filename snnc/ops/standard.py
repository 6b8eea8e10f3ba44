"""Records of the standard torch layers, functions and tensor methods the spiking IR keeps.

Their semantics are torch's own; the records say how the IR prints them, whether they pass spikes
through, whether they may see ``[T, N, ...]`` directly, and which stages lower them: ONNX and
TVM's torch frontend export the torch op itself (``FORWARD``); inference batch norm needs snnc's
own TVM converter (the frontend's converter uses batch statistics).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

from .registry import FORWARD, OpRecord, register

_TVM_BN = "snnc.targets.tvm_lower:_convert_batch_norm"
_INT_VIEW = "snnc.targets.tvm_int_lower:_emit_view"
_BOTH = {"onnx": FORWARD, "tvm": FORWARD}
_VIEW = {**_BOTH, "tvm:int": _INT_VIEW}


def _pair(v):
    if isinstance(v, (tuple, list)):
        return "x".join(str(i) for i in v) if len(set(v)) > 1 else str(v[0])
    return str(v)


def _conv_attrs(m):
    a = {"out": m.out_channels, "kernel": _pair(m.kernel_size), "stride": _pair(m.stride),
         "pad": _pair(m.padding)}
    if m.groups != 1:
        a["groups"] = m.groups
    if any(d != 1 for d in m.dilation):
        a["dilation"] = _pair(m.dilation)
    return a


def _pool_attrs(m):
    return {"kernel": _pair(m.kernel_size), "stride": _pair(m.stride), "pad": _pair(m.padding)}


_ADAPTIVE_MAX = "snnc.targets.tvm_tensor_ops:convert_adaptive_max_pool"
_IDENTITY = "snnc.targets.tvm_tensor_ops:convert_identity"


def _adaptive_attrs(m):
    return {"output": _pair(m.output_size)}


def _layer(name, modules, functions=(), attrs=None, spiking="no", hooks=_BOTH):
    """A layer over [N, C, ...]: not time-agnostic (conv/pool/BN read dim 0 as the batch, so the
    unroll pass runs them once on the merged [T*N, C, ...] batch)."""
    return OpRecord(name, modules=modules, functions=functions, spiking=spiking, time_agnostic=False,
                    attrs=attrs, hooks=hooks)


_NIR = {**_BOTH, "nir_out": FORWARD}
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)

for _rec in [
    _layer("nn.conv1d", (nn.Conv1d,), attrs=_conv_attrs, hooks=_NIR),
    _layer("nn.conv2d", (nn.Conv2d,), attrs=_conv_attrs, hooks=_NIR),
    _layer("nn.conv3d", (nn.Conv3d,), attrs=_conv_attrs),
    OpRecord("nn.linear", modules=(nn.Linear,), attrs=lambda m: {"out": m.out_features}, hooks=_NIR),
    _layer("nn.batch_norm", (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d), attrs=lambda m: {"eps": m.eps},
           hooks={"onnx": FORWARD, "tvm": _TVM_BN}),
    OpRecord("nn.relu", modules=(nn.ReLU,), functions=(torch.relu, F.relu), methods=("relu",), hooks=_BOTH),
    _layer("nn.avg_pool1d", (nn.AvgPool1d,), (F.avg_pool1d,), _pool_attrs),
    _layer("nn.avg_pool2d", (nn.AvgPool2d,), (F.avg_pool2d,), _pool_attrs, hooks=_NIR),
    _layer("nn.avg_pool3d", (nn.AvgPool3d,), (F.avg_pool3d,), _pool_attrs),
    _layer("nn.max_pool1d", (nn.MaxPool1d,), (F.max_pool1d,), _pool_attrs, spiking="keep"),
    _layer("nn.max_pool2d", (nn.MaxPool2d,), (F.max_pool2d,), _pool_attrs, spiking="keep"),
    _layer("nn.max_pool3d", (nn.MaxPool3d,), (F.max_pool3d,), _pool_attrs, spiking="keep"),
    _layer("nn.adaptive_avg_pool1d", (nn.AdaptiveAvgPool1d,), (F.adaptive_avg_pool1d,), _adaptive_attrs),
    _layer("nn.adaptive_avg_pool2d", (nn.AdaptiveAvgPool2d,), (F.adaptive_avg_pool2d,), _adaptive_attrs),
    _layer("nn.adaptive_avg_pool3d", (nn.AdaptiveAvgPool3d,), (F.adaptive_avg_pool3d,), _adaptive_attrs),
    _layer("nn.adaptive_max_pool", (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d),
           attrs=_adaptive_attrs, spiking="keep", hooks={"onnx": FORWARD, "tvm": _ADAPTIVE_MAX}),
    _layer("nn.flatten", (nn.Flatten,), attrs=lambda m: {"start_dim": m.start_dim}, spiking="keep",
           hooks={**_VIEW, "nir_out": FORWARD}),
    # dropout is the identity in eval mode, the mode every target exports (training-mode dropout
    # would make the reference itself random)
    OpRecord("nn.dropout", modules=_DROPOUTS, functions=(F.dropout,), spiking="keep",
             attrs=lambda m: {"p": m.p}, hooks={"onnx": FORWARD, "tvm": _IDENTITY, "nir_out": FORWARD}),
    OpRecord("nn.identity", modules=(nn.Identity,), spiking="keep", hooks=_NIR),
    OpRecord("add", functions=(operator.add, torch.add), methods=("add",), hooks=_NIR),
    OpRecord("mul", functions=(operator.mul, torch.mul), methods=("mul",), hooks=_NIR),
    OpRecord("div", functions=(operator.truediv, torch.div), methods=("div",), hooks=_BOTH),
]:
    register(_rec)
