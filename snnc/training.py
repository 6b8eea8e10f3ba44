"""``snnc.retrain``: train a multi-step spiking graph with a plain torch loop (STBP, Wu 2019).

The unrolled graph (``unroll_timesteps``) with surrogate gradients (``insert_surrogate``) is an
ordinary ``nn.Module``: any torch loop, optimiser or ``DistributedDataParallel`` trains it.
``retrain`` is that loop, with the checks a user would otherwise learn from a silent failure
(no surrogate = no gradient through spikes) and a history of per-epoch numbers.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys
import time

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from .errors import InputError, SnncError, one_of
from .ir import graph_spec, info
from .ops import Neuron
from .ops.gemm import routed_linears
from .ops.spike_store import STATE_MODES, compact_spikes, scan_state, spike_storage  # noqa: F401 (public)
from .ops.train_conv import MODES as CONV_MODES
from .ops.train_conv import int8_error_bound, spike_convs  # noqa: F401 (public)

LINEAR_MODES = ("float32", "exact")


def _check_trainable(gm):
    spec = graph_spec(gm)
    if not spec.get("T"):
        raise SnncError("retrain: the graph is per-step; unroll it first (snnc.passes.unroll_timesteps(gm, T)) "
                        "so one call covers all T steps and backpropagation runs through time")
    silent = [name for name, m in gm.named_modules() if isinstance(m, Neuron) and m.surrogate is None
              and not getattr(m, "builtin_backward", False)]
    if silent:
        raise SnncError(f"retrain: neuron(s) {silent[:4]}{' ...' if len(silent) > 4 else ''} have no surrogate "
                        "gradient, so no gradient reaches the layers before them; run "
                        "snnc.passes.insert_surrogate(gm, kind='atan') first")
    return spec


def _output_is_sequence(gm) -> bool:
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    i = info(out) if isinstance(out, fx.Node) else None
    return i is not None and i.layout == "seq"


def prepare_input(spec, x):
    """Batch ``x`` as the graph wants it: a ``seq`` graph given a static ``[N, ...]`` batch gets
    it repeated over T (direct coding); everything else passes through."""
    rank = len(spec["inputs"][0][0])
    if spec["layout"] == "seq" and x.dim() == rank - 1:
        return x.unsqueeze(0).expand(spec["T"], *x.shape)
    if x.dim() != rank:
        raise InputError(f"retrain: batch of shape {list(x.shape)} does not fit the graph input "
                         f"{list(spec['inputs'][0][0])} (layout {spec['layout']})")
    return x


def _make_optimizer(gm, optimizer, lr):
    if optimizer is None:
        return torch.optim.Adam(gm.parameters(), lr=lr)
    if isinstance(optimizer, torch.optim.Optimizer):
        return optimizer
    if callable(optimizer):  # an optimiser class or factory
        return optimizer(gm.parameters(), lr=lr)
    raise SnncError(f"retrain: optimizer must be None, a torch.optim.Optimizer or a factory, got {type(optimizer).__name__}")


def evaluate(gm: nn.Module, loader, device=None) -> float:
    """Top-1 accuracy (percent) of a multi-step graph on ``loader``."""
    spec = graph_spec(gm)
    seq_out = _output_is_sequence(gm)
    was_training = gm.training
    gm.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            x, y = (x.to(device), y.to(device)) if device else (x, y)
            out = gm(prepare_input(spec, x))
            out = out.mean(0) if seq_out else out
            correct += (out.argmax(-1) == y).sum().item()
            total += len(y)
    gm.train(was_training)
    return 100.0 * correct / max(total, 1)


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
_reusing = False


def reuse_freed_memory() -> bool:
    """Keep memory that torch frees on CPU inside the process for the next training step (glibc:
    no mmap for large blocks, no trimming of the heap). Returns whether it took effect.

    Why: an unrolled graph's activations are ``[T*N, ...]`` tensors, often over glibc's largest
    mmap threshold (32 MiB), so each one is a fresh ``mmap`` whose every page faults on first
    touch and goes back to the kernel on ``free``: the bench net's training step took ~80k-170k
    minor page faults, where a per-step loop of 8 MiB tensors reuses heap memory and takes none.
    Served from the heap, the step took ~5k (measured under load: 6.2 s -> 3.3 s per step).
    The process keeps its peak size afterwards, as torch's CUDA caching allocator does on a GPU.
    Process-wide and one-way; ``retrain`` calls it unless ``reuse_memory=False``."""
    global _reusing
    if _reusing:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    _reusing = ok
    return ok


def retrain(gm: nn.Module, loader, epochs: int = 1, optimizer=None, loss=None, lr: float = 1e-3,
            val_loader=None, device=None, grad_clip: float | None = None, progress=None,
            reuse_memory: bool = True, saved_state: str = "auto", convs: str = "int8",
            linears: str = "float32") -> list[dict]:
    """Train ``gm`` in place for ``epochs`` passes over ``loader`` (batches ``(x, y)``).

    ``optimizer``: None (Adam with ``lr``), an optimiser, or a factory ``f(params, lr=lr)``.
    ``loss``: ``f(output, y)``, default cross-entropy on the graph output (averaged over T first
    when the graph has no readout). Returns one dict per epoch: ``epoch``, ``loss`` (mean),
    ``train_acc`` (percent, on the training batches as seen), ``val_acc`` (with ``val_loader``),
    ``seconds``. With ``device`` the graph and batches are moved there. The graph is left in
    eval mode. ``reuse_memory``: call ``reuse_freed_memory`` first (CPU page faults per step).
    ``saved_state``: what the fused neuron scan keeps of its membrane ``z`` for backward
    (``snnc.ops.spike_store``, ``snnc.ops.neuron_scan``): ``"auto"`` (default): nothing where its
    input is a cheap training conv's output (``convs`` "int8"/"float32"; backward recomputes the
    conv output and ``z``, bit-identical), float32 elsewhere; ``"recompute"``: nothing after every
    training conv (least memory; one more conv forward per layer); ``"float32"``: keep ``z``
    (exact, the same gradients as both); ``"float16"``: keep ``z`` in half (bounded error).
    ``convs``: how Conv2d layers run in the training step (``snnc.ops.train_conv``): ``"int8"``
    (channels_last; layers fed by spikes compute their forward in int8 within
    ``int8_error_bound(weight)`` of fp32, where the CPU has VNNI/AMX; the backward is fp32),
    ``"float32"`` (channels_last fp32) or ``"exact"`` (the modules' own convs, bit-identical to
    the inference graph's forward).
    ``linears``: how nn.Linear layers run while training (``snnc.ops.gemm``): ``"float32"`` (the
    GEMM backend that won a per-shape race, MKL or oneDNN, float32 within K*2^-24*sum|ab|; a Linear
    feeding a neuron scan writes its output feature-major; the graph's Linears are plain again
    afterwards) or ``"exact"`` (``nn.Linear``'s own, bit-identical to the inference forward).
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise SnncError(f"retrain: epochs must be a positive int, got {epochs!r}")
    spec = _check_trainable(gm)
    for name, value, choices in (("saved_state", saved_state, STATE_MODES), ("convs", convs, CONV_MODES),
                                 ("linears", linears, LINEAR_MODES)):
        one_of("retrain", name, value, choices)
    compact_spikes(gm)
    if reuse_memory:
        reuse_freed_memory()
    if device is not None:
        gm.to(device)
    loss_fn = loss or nn.functional.cross_entropy
    opt = _make_optimizer(gm, optimizer, lr)
    seq_out = _output_is_sequence(gm)
    history = []
    # the Linears are routed for the training steps only (the inference graph stays as it was)
    with routed_linears(gm) if linears == "float32" else contextlib.nullcontext():
        for epoch in range(1, epochs + 1):
            gm.train()
            t0 = time.perf_counter()
            total_loss, correct, seen = 0.0, 0, 0
            bar = tqdm(loader, desc=f"retrain epoch {epoch}/{epochs}", leave=False, disable=True if progress is False else None)
            for x, y in bar:
                x, y = (x.to(device), y.to(device)) if device else (x, y)
                opt.zero_grad(set_to_none=True)
                with scan_state(saved_state), spike_convs(convs):
                    out = gm(prepare_input(spec, x))
                out = out.mean(0) if seq_out else out
                value = loss_fn(out, y)
                value.backward()
                if grad_clip:
                    nn.utils.clip_grad_norm_(gm.parameters(), grad_clip)
                opt.step()
                total_loss += value.item() * len(y)
                seen += len(y)
                if y.dim() == 1:
                    correct += (out.detach().argmax(-1) == y).sum().item()
                bar.set_postfix(loss=f"{total_loss / seen:.4f}")
            row = {"epoch": epoch, "loss": total_loss / max(seen, 1), "train_acc": 100.0 * correct / max(seen, 1)}
            if val_loader is not None:
                row["val_acc"] = evaluate(gm, val_loader, device)
            row["seconds"] = time.perf_counter() - t0
            history.append(row)
    gm.eval()
    return history
