"""Text dump of the spiking IR: one line per node, stable and deterministic.

    %3 : spike[4,16,64,32,32] = snn.lif(%2) {tau=2, v_th=1, reset=subtract}  # layer1.lif

Values are numbered in graph order. Types are ``spike[...]`` for values that carry spikes and
the dtype (``f32``, ``i8``, ``i32`` ...) otherwise; ``@seq`` / ``@flat`` mark the time layout
``[T, N, ...]`` / ``[T*N, ...]`` (``step`` is unmarked). Parameters are summarised, never printed.
"""
from __future__ import annotations

import torch
from torch import fx

from .ir import TensorInfo, annotate, graph_spec, info, op_spec

_DT = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16",
       torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
       torch.uint8: "u8", torch.bool: "bool"}


def dtype_str(dt) -> str:
    return _DT.get(dt, str(dt).replace("torch.", ""))


def tensor_str(t: torch.Tensor) -> str:
    return f"{dtype_str(t.dtype)}[{','.join(map(str, t.shape))}]"


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return format(v, ".6g")
    if isinstance(v, torch.Tensor):
        return tensor_str(v) if v.numel() > 1 else _fmt(v.item())
    if isinstance(v, (tuple, list)):
        return "(" + ", ".join(_fmt(i) for i in v) + ")"
    return str(v)


def _type(node) -> str:
    i = info(node)
    if i is None:
        v = node.meta.get("snnc")
        return type(v).__name__ if v is not None else "?"
    kind = "spike" if i.spiking else dtype_str(i.dtype)
    lay = "" if i.layout == "step" else f"@{i.layout}"
    return f"{kind}[{','.join(map(str, i.shape))}]{lay}"


def _arg(a, ids) -> str:
    if isinstance(a, fx.Node):
        return f"%{ids[a]}"
    if isinstance(a, (tuple, list)):
        return "(" + ", ".join(_arg(i, ids) for i in a) + ")"
    if isinstance(a, torch.dtype):
        return dtype_str(a)
    return _fmt(a)


def _params(mod) -> str:
    items = [(n, p) for n, p in mod.named_parameters(recurse=False)]
    items += [(n, b) for n, b in mod.named_buffers(recurse=False)
              if b is not None and not n.startswith(("running_", "num_batches"))
              and n not in getattr(mod, "attrs", lambda: {})()]
    return ", ".join(f"{n}={tensor_str(p)}" for n, p in items if p is not None)


def dump(gm: fx.GraphModule) -> str:
    """The IR of ``gm`` as text (annotates the graph first if it has no metadata)."""
    nodes = list(gm.graph.nodes)
    if any(n.op != "output" and "snnc" not in n.meta for n in nodes):
        annotate(gm)
    spec = graph_spec(gm)
    ids = {n: i for i, n in enumerate(nodes)}
    head = ", ".join(f"%{ids[n]}: {_type(n)}" for n in nodes if n.op == "placeholder")
    extra = f" T={spec['T']}" if spec.get("T") else ""
    lines = [f"graph({head}){extra} {{"]
    for n in nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            lines.append(f"  return {_arg(n.args[0], ids)}")
            continue
        spec_n = op_spec(gm, n)
        name = spec_n.name if spec_n else f"?{n.target}"
        args = ", ".join([_arg(a, ids) for a in n.args] + [f"{k}={_arg(v, ids)}" for k, v in n.kwargs.items()])
        line = f"  %{ids[n]} : {_type(n)} = {name}({args})"
        if n.op == "call_module":
            mod = gm.get_submodule(n.target)
            attrs = spec_n.attrs(mod) if spec_n and spec_n.attrs else {}
            if attrs:
                line += " {" + ", ".join(f"{k}={_fmt(v)}" for k, v in attrs.items()) + "}"
            params = _params(mod)
            if params:
                line += f" ({params})"
            line += f"  # {n.target}"
        elif n.op == "get_attr":
            line = f"  %{ids[n]} : {_type(n)} = get_attr {n.target}"
        lines.append(line)
    lines.append("}")
    return "\n".join(lines) + "\n"


__all__ = ["dump", "dtype_str", "tensor_str", "TensorInfo"]
