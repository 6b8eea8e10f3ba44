"""TVM converters of the tensor-level ops that TVM's torch frontend (``TorchFXImporter``) lacks;
named by the op records in ``snnc/ops/standard.py`` (their ``tvm`` hooks).

* Adaptive max pooling (1-D/2-D/3-D): torch's windows, one spatial axis at a time: output cell
  ``i`` of an axis of length ``L`` pools ``[floor(i*L/O), ceil((i+1)*L/O))``; a max over a box is
  the max over its axes taken in turn, so the separable form is exact.
* Dropout (every variant): the identity, as in eval mode.
"""
from __future__ import annotations

from tvm import relax

from snnc.ir import info


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def convert_adaptive_max_pool(imp, node):
    mod, x = imp.named_modules[node.target], imp.env[node.args[0]]
    bb = imp.block_builder
    shape = [int(s) for s in info(node.args[0]).shape]
    spatial = len(shape) - 2
    sizes = _tuple(mod.output_size, spatial)
    for k, out in enumerate(sizes):
        axis, length = 2 + k, shape[2 + k]
        out = length if out is None else int(out)
        if out == length:
            continue
        if length % out == 0:   # equal windows: split the axis and take the max over the window
            new = shape[:axis] + [out, length // out] + shape[axis + 1:]
            x = bb.emit(relax.op.max(bb.emit(relax.op.reshape(x, new)), axis=axis + 1))
        else:
            cells = []
            for i in range(out):
                lo, hi = (i * length) // out, -((-(i + 1) * length) // out)
                piece = bb.emit(relax.op.strided_slice(x, axes=[axis], begin=[lo], end=[hi]))
                cells.append(bb.emit(relax.op.max(piece, axis=axis, keepdims=True)))
            x = bb.emit(relax.op.concat(cells, axis=axis))
        shape[axis] = out
    return x


def convert_identity(imp, node):
    return imp.env[node.args[0]]


def convert_getitem(imp, node):
    """Basic indexing of a tensor (ints, slices with any sign and step, ``None``, ``...``) as one
    ``strided_slice`` and a reshape to the IR's shape for the result. The frontend's converter
    keeps an int-indexed axis (``x[:, 0]`` stays ``[N, 1, ...]``) and reads ``x[-1]`` as an empty
    slice; tuples, shapes and tensor indices still go to it."""
    x, idx = imp.env[node.args[0]], node.args[1]
    out = info(node)
    src = info(node.args[0]) if isinstance(node.args[0], type(node)) else None
    idx = idx if isinstance(idx, tuple) else (idx,)
    if src is None or out is None or not all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in idx):
        return imp._getitem(node)
    shape = [int(s) for s in src.shape]
    real = [i for i in idx if i is not None and i is not Ellipsis]
    if Ellipsis in idx:
        k = idx.index(Ellipsis)
        idx = idx[:k] + (slice(None),) * (len(shape) - len(real)) + idx[k + 1:]
    axes, begin, end, strides = [], [], [], []
    axis = 0
    for i in idx:
        if i is None:
            continue
        if isinstance(i, int):
            i = i + shape[axis] if i < 0 else i
            axes.append(axis), begin.append(i), end.append(i + 1), strides.append(1)
        else:
            start, stop, step = i.indices(shape[axis])
            if (start, stop, step) != (0, shape[axis], 1):
                axes.append(axis), begin.append(start), end.append(stop), strides.append(step)
        axis += 1
    bb = imp.block_builder
    if axes:
        x = bb.emit(relax.op.strided_slice(x, axes=axes, begin=begin, end=end, strides=strides))
    return bb.emit(relax.op.reshape(x, [int(s) for s in out.shape]))
