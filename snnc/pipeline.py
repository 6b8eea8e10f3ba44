"""What the CLI commands share: open any model file, build the compile pipeline, feed data sets.

``open_model(path)`` reads a ``.nir`` file, an snnc graph (``snnc.save``) or a ``torch.save``'d
``nn.Module``; ``build_passes`` lists the pipeline stages that ``snnc compile`` runs through a
``PassManager`` (so ``--dump-ir`` writes one IR file per stage); ``batches`` adapts a data set's
samples to a compiled module's input layout, and ``evaluate`` measures accuracy and latency.
"""
from __future__ import annotations

import importlib
import pickle
import statistics
import time

import torch
from torch import fx, nn

from .errors import FileFormatError, InputError, SnncError
from .fileio import require_file


def open_model(path, dt=None, model_class: str | None = None, trust: bool = False):
    """``(kind, obj)``: ``("graph", GraphModule)`` for ``.nir`` / snnc graph files, ``("module", nn.Module)``
    for a torch model (trace it with an example input).

    A torch model is read the way torch recommends since 2.6: a ``state_dict`` (loaded with
    ``weights_only=True``) plus ``model_class="pkg.mod:Net"`` (imported and built with no
    arguments). A pickled ``nn.Module`` (``torch.save(model)``) can run code when read, so it
    loads only with ``trust=True`` (CLI ``--trust-model-file``), with a warning."""
    from .fileio import is_bundle
    path = require_file(path, "model file")
    if path.suffix == ".nir":
        from .nir import from_nir
        return "graph", from_nir(path, dt=dt)
    if is_bundle(path):
        from .runtime import load_graph
        return "graph", load_graph(path)
    if model_class:
        return "module", _module_from_state_dict(path, model_class)
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError:
        obj = None  # holds Python objects beyond tensors: a pickled module (or worse)
    except Exception as e:  # truncated zip, not a torch file at all
        raise FileFormatError(f"{path} is not a readable torch/snnc model file: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}") from None
    if obj is not None:
        if isinstance(obj, dict):
            raise FileFormatError(f"{path} holds a state_dict: give the model class that takes it "
                                  "(--model-class pkg.module:Net)")
        raise FileFormatError(f"{path} holds a {type(obj).__name__}, expected a state_dict, a module or an snnc graph")
    if not trust:
        raise FileFormatError(f"{path} is a pickled Python object (a torch.save'd module?), which can run code "
                              "when read: save model.state_dict() and give --model-class pkg.module:Net, or pass "
                              "--trust-model-file if you trust this file")
    from .runtime import load_trusted_pickle
    obj = load_trusted_pickle(path, "torch model file")
    if isinstance(obj, dict) and obj.get("format") == "snnc-graph":  # the graph format before version 2
        from .runtime import load_graph
        return "graph", load_graph(path, trust=True)
    if isinstance(obj, fx.GraphModule) and hasattr(obj, "snnc_spec"):
        return "graph", obj
    if isinstance(obj, nn.Module):
        return "module", obj.eval()
    raise FileFormatError(f"{path} holds a {type(obj).__name__}, expected an nn.Module or an snnc graph")


def _module_from_state_dict(path, model_class: str) -> nn.Module:
    module_name, _, attr = model_class.partition(":")
    if not module_name or not attr:
        raise SnncError(f"--model-class {model_class!r}: expected pkg.module:ClassName")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise SnncError(f"--model-class {model_class!r}: cannot import it ({type(e).__name__}: {e})") from None
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as e:
        raise FileFormatError(f"{path} is not a state_dict file readable with weights_only=True: "
                              f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(state, dict):
        raise FileFormatError(f"{path} holds a {type(state).__name__}, expected a state_dict")
    try:
        model = cls()
        model.load_state_dict(state)
    except Exception as e:  # wrong class for these weights: name both
        raise SnncError(f"--model-class {model_class}: cannot load {path} into it: {type(e).__name__}: "
                        f"{str(e).splitlines()[0]}") from None
    return model.eval()


def optional(module: str, attr: str, feature: str):
    """``module.attr`` or an ``SnncError`` saying which feature is missing from this install."""
    try:
        return getattr(importlib.import_module(module), attr)
    except (ModuleNotFoundError, AttributeError) as e:
        raise SnncError(f"{feature} needs {module}.{attr}, which this snnc install does not have ({e})") from None


def _named(name, fn):
    fn.__name__ = name
    return fn


def build_passes(convert_calib=None, T=None, bits=None, convert_options=None, report=None):
    """The stages of ``snnc compile`` as PassManager entries (named callables). ``report``: a dict
    that receives ``"conversion"``, the conversion's choice (``snnc_conversion``)."""
    passes = []
    if convert_calib is not None:
        convert = optional("snnc.conversion", "convert", "--convert (ANN -> SNN conversion)")
        options = dict(convert_options or {})
        if T is not None and (options.get("method") in (None, "mse") or options.get("readout_calibration")):
            options.setdefault("T_target", T)  # mse tunes, and the default chooses, for the T it will run at
        report = {} if report is None else report

        def convert_pass(gm):
            # per-step result (T=None): unrolling is the next stage, with its own IR dump
            out = convert(gm, convert_calib, T=None, **options)
            report["conversion"] = getattr(out, "snnc_conversion", None)   # what the default chose
            return out
        passes.append(_named("convert", convert_pass))
    if T is not None:
        from .passes import unroll_timesteps

        def unroll(gm):
            return gm if gm.snnc_spec.get("T") else unroll_timesteps(gm, T=T)
        passes.append(_named("unroll_timesteps", unroll))
    if bits is not None:
        quantize = optional("snnc.passes", "quantize_integer", "--bits (integer quantisation)")
        passes.append(_named("quantize_integer", lambda gm: quantize(gm, weight_bits=bits)))
    return passes


def check_target(target: str) -> None:
    """Fail before any work if ``target`` is unknown or its module is missing from this install."""
    from .compiled import TARGETS
    if target not in TARGETS:
        raise SnncError(f"unknown target {target!r}; available: {', '.join(TARGETS)}")
    try:
        importlib.import_module(TARGETS[target])
    except ModuleNotFoundError as e:
        raise SnncError(f"target {target!r} is not available in this install ({e})") from None


def compile_target(gm, target, **options):
    from .compiled import compile
    check_target(target)
    return compile(gm, target=target, **options)


def open_compiled(path, T=None, dt=None, trust=False):
    """A callable compiled module: an exported artefact (``snnc compile``), or a graph / .nir
    file compiled for the torch target (a per-step graph with neurons is unrolled over ``T`` first)."""
    from .compiled import COMPILED_FORMAT, META_SUFFIX, load
    from .fileio import bundle_format, is_bundle
    from .ops import Neuron
    path = require_file(path, "compiled module")
    if path.with_name(path.name + META_SUFFIX).exists() and not is_bundle(path):
        return load(path, trust=trust)
    if bundle_format(path) == COMPILED_FORMAT:
        return load(path)
    kind, obj = open_model(path, dt=dt, trust=trust)
    if kind != "graph":
        raise FileFormatError(f"{path} is a torch module, not a compiled snnc module: compile it first (snnc compile)")
    if not obj.snnc_spec.get("T") and obj.snnc_spec["layout"] == "step" and \
            any(isinstance(m, Neuron) for m in obj.modules()):
        if T is None:
            raise SnncError(f"{path} is a per-step spiking graph: give --T to run it over T time steps")
        from .passes import unroll_timesteps
        obj = unroll_timesteps(obj, T=T)
    return compile_target(obj, "torch")


def batches(module, dataset, batch_size=256, limit=None):
    """``(x, y)`` batches shaped for ``module``'s input spec: static samples are repeated over T for
    multi-step inputs, and ``[N, T, ...]`` event samples become ``[T, N, ...]``."""
    spec = module.spec
    want_rank = len(spec["inputs"][0][0])
    seq = spec["layout"] == "seq"
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(0, n, batch_size):
        items = [dataset[j] for j in range(i, min(i + batch_size, n))]
        x = torch.stack([it[0] for it in items]).float()
        y = torch.as_tensor([int(it[1]) for it in items])
        if seq and x.dim() == want_rank - 1:
            x = x.unsqueeze(0).expand(spec["T"] or 1, *x.shape).contiguous()
        elif seq and x.dim() == want_rank:
            x = x.transpose(0, 1).contiguous()
        elif x.dim() != want_rank:
            raise InputError(f"data samples of shape {list(x.shape[1:])} do not fit the module's input "
                             f"{list(spec['inputs'][0][0])} (layout {spec['layout']}); for time-series data "
                             "compile with --T to unroll the graph")
        yield x, y


def logits(out):
    """Class scores ``[N, C]`` from a module output (a ``[T, N, C]`` sequence is averaged over T)."""
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.float().mean(0) if out.dim() == 3 else out


def evaluate(module, dataset, batch_size=256, limit=None, warmup=1):
    """Accuracy (%) and latency (median ms per batch) of ``module`` on ``dataset``."""
    correct = total = 0
    runs = []  # (seconds, samples) per batch
    for x, y in batches(module, dataset, batch_size, limit):
        t0 = time.perf_counter()
        out = module(x)
        runs.append((time.perf_counter() - t0, len(y)))
        correct += int((logits(out).argmax(-1) == y).sum())
        total += len(y)
    if total == 0:
        raise InputError("the data set is empty")
    timed = runs[warmup:] if len(runs) > warmup else runs  # the first call may compile or allocate
    return {"accuracy": 100.0 * correct / total, "samples": total, "batch_size": batch_size,
            "latency_ms_per_batch": 1e3 * statistics.median(t for t, _ in timed),
            "samples_per_s": sum(n for _, n in timed) / sum(t for t, _ in timed)}
