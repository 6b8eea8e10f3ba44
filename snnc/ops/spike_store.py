"""Spikes saved for backward as uint8, and the precision of the scan's saved membrane.

A 0/1 spike tensor is exact in one byte. The fused scan (``snnc.ops.neuron_scan``) writes every
spike train twice: as float32 (the layer's output, what the next convolution or linear reads) and
as uint8 (kept by the scan's own backward). The next layer saves its float32 input for its weight
gradient ``dW = Σ grad_out ⊗ spikes``; under ``spike_storage()`` that saved input is the uint8
copy instead (a view with the same geometry), converted back to float32 only when the backward
reads it — so ``dW`` is bit-identical, and the float32 spikes are freed as soon as the forward
has consumed them. Per neuron and step this keeps 1 byte instead of 4.

``scan_state("float16")`` additionally keeps the scan's ``z = H - v_th`` in IEEE half (saturated
at ±65504) instead of float32: 2 bytes instead of 4, at a relative error of at most 2^-11 in
``z`` (the surrogate ``g(z)`` then moves by at most ~2^-10 relatively for atan/sigmoid; spikes and
the forward are unchanged, the reset's S comes from the exact uint8 spikes).

Under ``compact_spikes(gm)`` a neuron whose input current is a convolution's or linear layer's
output used by nothing else (read from the fx graph at each call) writes its float32 spikes over
that input current: the current is needed by the scan only (neither layer keeps its output for
backward), so the layer's output, spikes and z never coexist in three buffers.

``scan_state("auto")`` (``retrain``'s default) and ``"recompute"`` keep no ``z`` where the scan's
input is a training conv's output (cheap convs only / every one): backward runs the conv and the
scan forward again, bit-identically (``neuron_scan._NeuronScan``). Where the memory of one training
step goes, measured on the bench net (conv 3->64->128->128 + LIF, 32x32, T=32, N=16: one float32
[T, N, 128, 32, 32] tensor is 256 MiB; RSS with every large tensor mapped on its own, MiB):

    kept for backward             conv input               scan z (fp32)   scan spikes (uint8)
    layer 1 (3->64, fan-in 27)    the batch (fp32, 6)      128 | none*     32
    layer 2 (64->128, 576)        layer 1's uint8 (shared)  256 | none**   64
    layer 3 (128->128, 1152)      layer 2's uint8 (shared)  256 | none**   64
    total kept after forward: 800 ("float32"), 672 ("auto": * not kept), 160 ("recompute": ** too)

    peaks (MiB)                                               old float32   auto   recompute
    forward, conv 3 (int8): layer 2's float32 spikes (its input, 256)
      + stacked uint8 [254 s | s] (128) + its output (256) + kept       1119      991      735
    end of forward: output spikes (256) + kept                          1055      927      415
    backward, scan 3: dL/dX (256, a new buffer before; now written
      over z where z is ours; "recompute": + conv 3 run again)          1055      671      543
    backward, conv 3: dL/dinput (256) + the spike count's int64 copy
      of its uint8 input (512 before; count_nonzero: none)              1247      896      640

So ``"auto"`` gives 991 MiB = 0.43x spikingjelly's 2312 at the same step (``bench/training.py
--only memory``); the largest remaining transient is the int8 forward's stacked copy of the spikes.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch

from ..errors import one_of

_live: dict = {}           # storage data_ptr -> (weakref to the float spikes, uint8 spikes, version)
_local = threading.local()  # per thread: the saved-z dtype, the stack of pushed hooks
# what the scan keeps of z: "recompute" keeps nothing where the input current is a training conv's
# output (backward recomputes it, bit-identical; see neuron_scan), "auto" only where that conv is
# cheap to run again (train_conv.CHEAP_FAN_IN), and float32 elsewhere
_STATE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "recompute": torch.float32,
                 "auto": torch.float32}
STATE_MODES = tuple(_STATE_DTYPES)


class _Packed:
    """A saved spike tensor in its uint8 form (what autograd holds until backward)."""

    __slots__ = ("u8", "__weakref__")

    def __init__(self, u8):
        self.u8 = u8


def _drop(key, ref):
    entry = _live.get(key)
    if entry is not None and entry[0] is ref:
        del _live[key]


def register(spikes, spikes_u8):
    """Record that ``spikes`` (float32 0/1) has the exact copy ``spikes_u8`` (same shape, dense)."""
    if spikes.numel() == 0:
        return
    key = spikes.untyped_storage().data_ptr()
    ref = weakref.ref(spikes, lambda r, key=key: _drop(key, r))
    _live[key] = (ref, spikes_u8, spikes._version)


def lookup(t):
    """The uint8 view equal to ``t`` when ``t`` is (a view of) a registered spike tensor, else None."""
    if _live and isinstance(t, torch.Tensor) and t.dtype is torch.float32 and t.device.type == "cpu" and t.numel():
        storage = t.untyped_storage()
        entry = _live.get(storage.data_ptr())
        # same storage, still alive, not written in place since the scan produced it
        if (entry is not None and entry[0]() is not None and t._version == entry[2]
                and storage.nbytes() == 4 * entry[1].numel()):
            return entry[1].as_strided(t.size(), t.stride(), t.storage_offset())
    return None


def _pack(t):
    u8 = lookup(t)
    return t if u8 is None else _Packed(u8)


def _unpack(p):
    return p.u8.to(torch.float32) if type(p) is _Packed else p


@contextlib.contextmanager
def spike_storage():
    """Within this block, tensors saved for backward that are spike outputs of the fused scan are
    kept as uint8 (exact; see the module docstring)."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


def _stack():
    if not hasattr(_local, "pushed"):
        _local.pushed = []
    return _local.pushed


def _single_use_producers(gm):
    """``{neuron: producer}`` for the neurons of ``gm`` whose input is, through time.split views
    only, the output of a Conv/Linear module (``producer``) called once and read by nothing else."""
    from torch import fx, nn

    from .coding import SplitTime
    from .neurons import Neuron
    if not isinstance(gm, fx.GraphModule):
        return {}
    mods = dict(gm.named_modules())
    calls = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1

    def module(node, kinds):
        return (isinstance(node, fx.Node) and node.op == "call_module" and len(node.users) == 1
                and calls[node.target] == 1 and isinstance(mods.get(node.target), kinds))
    donors = {}
    for n in gm.graph.nodes:
        if n.op != "call_module" or calls[n.target] != 1 or not isinstance(mods.get(n.target), Neuron) or len(n.args) != 1:
            continue
        src = n.args[0]
        while module(src, SplitTime):
            src = src.args[0]
        if module(src, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and type(mods[src.target]).forward in (
                nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward, nn.Linear.forward):
            donors[mods[n.target]] = mods[src.target]
    return donors


def may_overwrite_input(neuron) -> bool:
    """Whether ``neuron``'s input current is its own to overwrite in the current graph call."""
    return neuron in getattr(_local, "donors", ())


def neuron_fed_by(module):
    """The neuron whose input current is ``module``'s output alone in the current graph call (a
    ``compact_spikes`` graph; see ``_single_use_producers``), else None."""
    return next((n for n, p in getattr(_local, "donors", {}).items() if p is module), None)


def _enter(module, args):
    try:
        torch._C._autograd._push_saved_tensors_default_hooks(_pack, _unpack)
        pushed = True
    except RuntimeError:   # hooks disabled here (e.g. inside torch.compile tracing): plain saving
        pushed = False
    from .train_conv import ConvMode, conv_mode
    mode = ConvMode() if pushed and conv_mode() != "exact" and torch.is_grad_enabled() else None
    if mode is not None:
        mode.__enter__()
    _stack().append((pushed, getattr(_local, "donors", {}), mode))
    _local.donors = _single_use_producers(module) if pushed else {}


def _exit(module, args, output):
    stack = _stack()
    if stack:
        pushed, _local.donors, mode = stack.pop()
        if mode is not None:
            mode.__exit__(None, None, None)
        if pushed:
            torch._C._autograd._pop_saved_tensors_default_hooks()


def compact_spikes(module):
    """Make every call of ``module`` run under ``spike_storage()``, and its Conv/Linear layers
    fed by spikes compute their weight gradient from uint8 (``spike_layers``); forward hooks,
    idempotent. Returns ``module``."""
    from torch import nn

    from .spike_layers import spike_input_hook
    # look at the hooks themselves: a copy of a module may or may not carry them
    if _enter not in module._forward_pre_hooks.values():
        module.register_forward_pre_hook(_enter)
        module.register_forward_hook(_exit, always_call=True)
    for m in module.modules():   # the weight gradient of layers fed by spikes reads uint8
        if type(m) in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear) and spike_input_hook not in m._forward_hooks.values():
            m.register_forward_hook(spike_input_hook)
    return module


def state_dtype():
    """The dtype the fused scan saves ``z`` in on this thread (float32 unless ``scan_state``)."""
    return getattr(_local, "state", torch.float32)


def recompute_state() -> str | None:
    """Where the fused scan recomputes ``z`` in backward instead of keeping it on this thread:
    ``"recompute"`` (after every training conv), ``"auto"`` (after cheap ones) or None."""
    return getattr(_local, "recompute", None)


@contextlib.contextmanager
def scan_state(dtype: str = "float16"):
    """Within this block (this thread), the fused scan keeps ``z`` for backward in ``dtype``
    (``"float16"``: half the bytes, bounded error; ``"float32"``: exact; ``"recompute"``: nothing
    where its input is a training conv's output, bit-identical gradients, else float32;
    ``"auto"``: as "recompute" where that conv is cheap (few inputs per output), else float32)."""
    one_of("scan_state", "dtype", dtype, sorted(_STATE_DTYPES), ValueError)
    old = state_dtype(), recompute_state()
    _local.state, _local.recompute = _STATE_DTYPES[dtype], dtype if dtype in ("recompute", "auto") else None
    try:
        yield
    finally:
        _local.state, _local.recompute = old
