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


for _rec in [
    OpRecord("nn.conv1d", modules=(nn.Conv1d,), time_agnostic=False, attrs=_conv_attrs,
             hooks={**_BOTH, "nir_out": FORWARD}),
    OpRecord("nn.conv2d", modules=(nn.Conv2d,), time_agnostic=False, attrs=_conv_attrs,
             hooks={**_BOTH, "nir_out": FORWARD}),
    OpRecord("nn.linear", modules=(nn.Linear,), attrs=lambda m: {"out": m.out_features},
             hooks={**_BOTH, "nir_out": FORWARD}),
    OpRecord("nn.batch_norm", modules=(nn.BatchNorm1d, nn.BatchNorm2d), time_agnostic=False,
             attrs=lambda m: {"eps": m.eps}, hooks={"onnx": FORWARD, "tvm": _TVM_BN}),
    OpRecord("nn.relu", modules=(nn.ReLU,), functions=(torch.relu, F.relu), methods=("relu",), hooks=_BOTH),
    OpRecord("nn.avg_pool2d", modules=(nn.AvgPool2d,), functions=(F.avg_pool2d,), time_agnostic=False,
             attrs=_pool_attrs, hooks={**_BOTH, "nir_out": FORWARD}),
    OpRecord("nn.max_pool2d", modules=(nn.MaxPool2d,), functions=(F.max_pool2d,), spiking="keep",
             time_agnostic=False, attrs=_pool_attrs, hooks=_BOTH),
    OpRecord("nn.adaptive_avg_pool2d", modules=(nn.AdaptiveAvgPool2d,), functions=(F.adaptive_avg_pool2d,),
             time_agnostic=False, attrs=lambda m: {"output": _pair(m.output_size)}, hooks=_BOTH),
    OpRecord("nn.flatten", modules=(nn.Flatten,), spiking="keep", time_agnostic=False,
             attrs=lambda m: {"start_dim": m.start_dim}, hooks={**_VIEW, "nir_out": FORWARD}),
    OpRecord("nn.dropout", modules=(nn.Dropout,), functions=(F.dropout,), spiking="keep",
             attrs=lambda m: {"p": m.p}, hooks={**_BOTH, "nir_out": FORWARD}),
    OpRecord("nn.identity", modules=(nn.Identity,), spiking="keep", hooks={**_BOTH, "nir_out": FORWARD}),
    OpRecord("add", functions=(operator.add, torch.add), methods=("add",), hooks={**_BOTH, "nir_out": FORWARD}),
    OpRecord("mul", functions=(operator.mul, torch.mul), methods=("mul",), hooks={**_BOTH, "nir_out": FORWARD}),
    OpRecord("div", functions=(operator.truediv,), hooks=_BOTH),
    OpRecord("cat", functions=(torch.cat,), spiking="keep", hooks=_BOTH),
    OpRecord("flatten", functions=(torch.flatten,), methods=("flatten",), spiking="keep", time_agnostic=False,
             hooks={**_VIEW, "nir_out": FORWARD}),
    OpRecord("getitem", functions=(operator.getitem,), spiking="keep", hooks=_BOTH),
    OpRecord("getattr", functions=(getattr,), hooks=_BOTH),
    OpRecord("view", methods=("view",), spiking="keep", time_agnostic=False, hooks=_VIEW),
    OpRecord("reshape", methods=("reshape",), spiking="keep", time_agnostic=False, hooks=_VIEW),
    OpRecord("size", methods=("size",), hooks=_BOTH),
    OpRecord("contiguous", methods=("contiguous",), spiking="keep", hooks=_VIEW),
]:
    register(_rec)
