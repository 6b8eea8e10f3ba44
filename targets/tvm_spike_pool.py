"""TVM lowering of ``snnc.ops.SpikeMaxPool2d`` (the op record's ``tvm`` hook), ``mode="lateral"``
only: the op's multi-step forward written in Relax ops on ``[T, N, C, H, W]``:

    S = cumsum(X, axis=0);   M = max_pool2d(S as [T*N, C, H, W]);   Y[0] = M[0], Y[t] = M[t] - M[t-1]

(lateral-inhibition pooling, Li 2022: the output's running sum is the max of the inputs' running
sums). ``mode="gate"`` gathers the winner's input per step and has no lowering here.
"""
from __future__ import annotations

from tvm import relax

from snnc.errors import UnsupportedOp, node_ref

from .tvm_lower import _seq_shape


def convert_spike_max_pool(imp, node):
    mod, x = imp.named_modules[node.target], imp.env[node.args[0]]
    if mod.mode != "lateral":
        raise UnsupportedOp(f"{node_ref(node)}: snn.max_pool2d with mode={mod.mode!r} has no TVM lowering "
                            "(mode='lateral' has); run it on the torch or onnx target")
    (shape, _), (out_shape, _) = _seq_shape(node.args[0]), _seq_shape(node)
    bb, steps = imp.block_builder, shape[0]
    sums = bb.emit(relax.op.reshape(relax.op.cumsum(x, axis=0), (steps * shape[1], *shape[2:])))
    m = bb.emit(relax.op.nn.max_pool2d(sums, mod.kernel_size, mod.stride, mod.padding))
    m = bb.emit(relax.op.reshape(m, out_shape))
    if steps == 1:
        return m
    first = bb.emit(relax.op.strided_slice(m, axes=[0], begin=[0], end=[1]))
    later = bb.emit(relax.op.subtract(relax.op.strided_slice(m, axes=[0], begin=[1], end=[steps]),
                                      relax.op.strided_slice(m, axes=[0], begin=[0], end=[steps - 1])))
    return bb.emit(relax.op.concat([first, later], axis=0))
