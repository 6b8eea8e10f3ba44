"""The ``snnc`` command line. Each subcommand is a ``cmd_<name>(args)`` function plus its
arguments in ``snnc.cli_parser``; errors from snnc print one line and exit 1 (usage errors exit 2).

    snnc compile MODEL [--convert --calib digits] [--T 8] [--bits 8] --target tvm:llvm [--dump-ir DIR] -o OUT
    snnc inspect FILE|DIR          snnc run OUT --data digits       snnc report MODEL --data digits --T 8 --out DIR
    snnc bench [NAME] [--quick]    snnc nir GRAPH -o FILE.nir        snnc retrain GRAPH --data digits -o OUT
"""
from __future__ import annotations

import difflib
import json
import subprocess
import sys
from pathlib import Path

from .cli_parser import build_parser
from .errors import SnncError

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def _dataset(spec, split, T=None, limit=None):
    from torch.utils.data import Subset

    from .data import from_spec
    ds = from_spec(spec, split, T)
    return Subset(ds, range(min(limit, len(ds)))) if limit else ds


def _graph_from(args, data_spec=None):
    """The spiking-IR graph of MODEL: read it, or trace a torch module on one data sample."""
    import torch

    from .pipeline import open_model
    from .tracer import trace
    kind, obj = open_model(args.model, dt=getattr(args, "dt", None), model_class=getattr(args, "model_class", None),
                           trust=getattr(args, "trust_model_file", False))
    if kind == "graph":
        return obj
    if args.input_shape:
        example = torch.zeros(args.input_shape)
    elif data_spec:
        example = _dataset(data_spec, "train", limit=1)[0][0].unsqueeze(0).float()
    else:
        raise SnncError(f"{args.model} is a torch module: give --input-shape N,C,H,W (or --calib/--data) to trace it")
    return trace(obj, example)


def _refuse_overwrite(path, overwrite, *more):
    for p in (Path(path), *more):
        if p.is_dir():
            raise SnncError(f"{p} is a directory; give the file to write")
        if p.exists() and not overwrite:
            raise SnncError(f"{p} exists; pass --overwrite to replace it")


# --convert options -> snnc.convert keyword arguments (None: not given, snnc.convert's default)
_CONVERT_OPTIONS = ("method", "q", "channel_wise", "bias_correction", "max_pool", "reset", "encoding", "scale",
                    "v_init_fraction", "T_calib", "T_target", "burst", "readout_calibration")


def _conversion_options(args) -> dict:
    opts = {k: getattr(args, k) for k in _CONVERT_OPTIONS if getattr(args, k, None) is not None}
    if opts.get("method") == "auto":
        del opts["method"]
    return opts


def _print_conversion(report):
    if not report:
        return
    line = f"conversion: {report['method']}"
    if report.get("scores"):
        agree = report["scores"][report["method"]]["agreement"]
        line += (f" (chosen for T={report['T']}: {agree:.1f}% agreement with the ANN on the calibration data; "
                 "others: " + ", ".join(f"{k} {v['agreement']:.1f}%" for k, v in report["scores"].items()
                                         if k != report["method"]) + ")")
    elif report.get("chosen_by") and report["chosen_by"] != "user":
        line += f" ({report['chosen_by']})"
    print(line)


def _check_dump_dir(path):
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise SnncError(f"--dump-ir {path} is a file; give a folder for the IR dumps")


def cmd_compile(args) -> int:
    """Trace or read MODEL, run the pipeline (convert, unroll, quantise), compile, export."""
    from torch.utils.data import DataLoader

    from .passmanager import PassManager
    from .pipeline import build_passes, check_target, compile_target
    if args.convert and not args.calib:
        raise SnncError("--convert needs --calib DATA (calibration data for threshold balancing)")
    options, chosen = _conversion_options(args), {}
    if options and not args.convert:
        given = ", ".join("--" + k.replace("_", "-") for k in options)
        raise SnncError(f"{given}: conversion options need --convert")
    check_target(args.target)
    _check_spike_digits(args)
    _refuse_overwrite(args.output, args.overwrite)
    _check_dump_dir(args.dump_ir)
    gm = _graph_from(args, args.calib)
    calib = DataLoader(_dataset(args.calib, "train", limit=args.calib_samples), batch_size=64) if args.convert else None
    pm = PassManager(build_passes(calib, args.T, args.bits, options, report=chosen), dump_dir=args.dump_ir)
    gm = pm.run(gm)
    _print_conversion(chosen.get("conversion"))
    tune = {k: v for k, v in (("trials", args.trials), ("tune_minutes", args.tune_minutes),
                              ("database", args.tune_database)) if v is not None}
    if args.tune or tune:
        if args.target != "tvm:llvm":
            raise SnncError(f"--tune: tuning is for --target tvm:llvm, not {args.target}")
        tune.update(tune=True, mode="relax")  # the tuned kernels live in the exported library
    if args.loop and args.target != "onnx":
        raise SnncError(f"--loop is an option of the onnx target, not of {args.target}")
    if args.loop:
        tune["loop"] = args.loop
    tune.update(_spike_digit_options(args, gm))
    module = compile_target(gm, args.target, **tune)
    for conv, row in (module.meta.get("spike_digits") or {}).items():
        measured = "" if row["agreement"] is None else f", {100 * row['agreement']:.3f}% spike agreement on --calib"
        print(f"  spike conv {conv}: {row['digits']} int8 weight digit(s){measured}")
    out = module.export(args.output, overwrite=args.overwrite)
    for name, sec in pm.timings:
        print(f"  {name:<18} {sec * 1e3:8.1f} ms")
    where = f", IR dumps in {args.dump_ir}" if args.dump_ir else ""
    print(f"compiled {args.model} -> {out} (target {args.target}, T={gm.snnc_spec.get('T')}{where})")
    return 0


def _check_spike_digits(args) -> None:
    """--spike-digits' own checks, before any file is read."""
    if args.spike_digits is not None and args.target != "tvm:llvm":
        raise SnncError(f"--spike-digits is an option of the tvm:llvm target, not of {args.target}")
    if args.spike_digits == "auto" and not args.calib:
        raise SnncError("--spike-digits auto measures spike agreement: it needs --calib DATA")


def _spike_digit_options(args, gm) -> dict:
    """``spike_digits`` (and for "auto" ``calib``: the first --calib-samples of --calib, at most 64,
    shaped for the graph's input) for ``snnc.compile``."""
    if args.spike_digits is None:
        return {}
    if args.spike_digits != "auto":
        return {"spike_digits": int(args.spike_digits)}
    from types import SimpleNamespace

    from .ir import graph_spec
    from .pipeline import batches
    data = _dataset(args.calib, "train", T=args.T, limit=min(args.calib_samples, 64))
    x, _ = next(batches(SimpleNamespace(spec=graph_spec(gm)), data, batch_size=64))
    return {"spike_digits": "auto", "calib": x}


def cmd_inspect(args) -> int:
    """Print the IR of a saved graph or .nir file, or the per-pass dumps of a --dump-ir folder with diffs."""
    from .printer import dump
    from .runtime import load_graph
    path = Path(args.path)
    if path.is_dir():
        files = sorted(path.glob("*.ir"))
        if not files:
            raise SnncError(f"{path} holds no .ir dump files (write them with --dump-ir or PassManager(dump_dir=...))")
        prev = None
        for f in files:
            text = f.read_text()
            if prev is None or args.full:
                print(f"== {f.name}\n{text}")
            else:
                diff = difflib.unified_diff(prev[1].splitlines(), text.splitlines(), prev[0], f.name, lineterm="", n=0)
                print("\n".join(diff) or f"== {f.name}: unchanged", end="\n\n")
            prev = (f.name, text)
        return 0
    if path.suffix == ".nir":
        from .nir import from_nir
        print(dump(from_nir(path, dt=args.dt)), end="")
        return 0
    print(dump(load_graph(path, trust=args.trust_model_file)), end="")
    return 0


def cmd_run(args) -> int:
    """Accuracy and latency of a compiled module (or graph file) on a data set."""
    from .pipeline import evaluate, open_compiled
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    module = open_compiled(args.path, T=args.T, dt=args.dt, trust=args.trust_model_file)
    res = evaluate(module, _dataset(args.data, args.split, args.T), batch_size=args.batch_size, limit=args.limit)
    res.update(path=str(args.path), target=module.target, T=module.spec.get("T"), data=args.data, split=args.split)
    if args.label:
        res["name"] = args.label
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{args.path} [{module.target}] on {args.data}/{args.split}: accuracy {res['accuracy']:.2f}% "
              f"({res['samples']} samples), {res['latency_ms_per_batch']:.2f} ms per batch of "
              f"{min(args.batch_size, res['samples'])}, "
              f"{res['samples_per_s']:.0f} samples/s")
    return 0


def cmd_report(args) -> int:
    """Firing rates, spike counts, SOPs vs MACs and energy; a table and PNG plots in --out."""
    from .ops import Neuron
    from .report import write_report
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SnncError(f"--out {out} is a file; give a folder for the report")
    gm = _graph_from(args, args.data)
    if not any(isinstance(m, Neuron) for m in gm.modules()):
        print(f"snnc report: warning: {args.model} has no spiking neurons (an ANN?): its SOPs and energy are "
              "those of the ANN itself; convert it first (snnc compile --convert) for an SNN estimate", file=sys.stderr)
    ann = None
    if args.ann:
        from .pipeline import open_model
        kind, ann = open_model(args.ann, trust=args.trust_model_file)
        if kind != "module":
            raise SnncError(f"--ann {args.ann}: expected a torch.save'd ANN module")
    x = _dataset(args.data, "test", args.T, limit=args.samples)
    paths = write_report(gm, x, T=args.T, out_dir=args.out, ann=ann, bench_json=args.bench_json,
                         overwrite=args.overwrite)
    print(Path(paths["table"]).read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def cmd_bench(args) -> int:
    """Run bench/<NAME>.py (all of them without NAME), or the built-in quick latency bench."""
    if args.builtin or not BENCH_DIR.is_dir():
        from .report import quick_latency_bench
        for line in quick_latency_bench(repeats=3 if args.quick else 7):
            print(json.dumps(line))
        return 0
    scripts = sorted(BENCH_DIR.glob("*.py"))
    if args.name:
        scripts = [s for s in scripts if s.stem == args.name]
        if not scripts:
            names = ", ".join(s.stem for s in sorted(BENCH_DIR.glob("*.py")))
            raise SnncError(f"no bench named {args.name!r} in {BENCH_DIR}; available: {names}")
    failed = []
    for s in scripts:
        # -P: bench/ is not put on sys.path, so bench/tvm.py cannot shadow the tvm package
        r = subprocess.run([sys.executable, "-P", str(s)] + (["--quick"] if args.quick else []))
        if r.returncode != 0:
            failed.append(s.stem)
    if failed:
        raise SnncError(f"bench scripts failed: {', '.join(failed)}")
    return 0


def cmd_nir(args) -> int:
    """Export a per-step graph (or a torch SNN module traced on --input-shape) to a NIR file."""
    from .nir import to_nir
    _refuse_overwrite(args.output, args.overwrite)
    import warnings
    gm = _graph_from(args)
    with warnings.catch_warnings(record=True) as notes:
        warnings.simplefilter("always")
        g = to_nir(gm, dt=args.dt or 1.0, path=args.output, overwrite=args.overwrite)
    for w in notes:   # what NIR's fields cannot say (readout, subtractive reset): one line each
        print(f"note: {w.message}")
    print(f"wrote {args.output} ({len(g.nodes)} NIR nodes, {len(g.edges)} edges, dt={args.dt or 1.0})")
    return 0


def cmd_retrain(args) -> int:
    """Fine-tune a graph with surrogate gradients (insert_surrogate + snnc.retrain) and save it."""
    from torch.utils.data import DataLoader

    from .ops import Neuron
    from .pipeline import optional
    from .runtime import save
    retrain = optional("snnc.training", "retrain", "snnc retrain")
    _refuse_overwrite(args.output, args.overwrite)
    gm = _graph_from(args, args.data)
    if not gm.snnc_spec.get("T"):
        if args.T is None:
            raise SnncError("retrain: the graph is per-step; give --T to unroll it (backpropagation through time)")
        from .passes import unroll_timesteps
        gm = unroll_timesteps(gm, T=args.T)
    if any(isinstance(m, Neuron) and m.surrogate is None for m in gm.modules()):
        insert_surrogate = optional("snnc.passes", "insert_surrogate", "snnc retrain")
        gm = insert_surrogate(gm, kind=args.surrogate)
    loader = DataLoader(_dataset(args.data, "train", args.T, limit=args.limit), batch_size=args.batch_size, shuffle=True)
    for row in retrain(gm, loader, epochs=args.epochs, lr=args.lr):
        print(json.dumps(row))
    save(gm, args.output, overwrite=args.overwrite)
    print(f"retrained {args.model} for {args.epochs} epoch(s) -> {args.output}")
    return 0


def main(argv=None) -> int:
    parser = build_parser({name[4:]: fn for name, fn in globals().items() if name.startswith("cmd_")})
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    import warnings
    try:
        with warnings.catch_warnings():  # snnc's warnings (e.g. trusting a pickle): one line each
            warnings.showwarning = lambda message, *a, **k: print(f"snnc {args.command}: warning: {message}",
                                                                  file=sys.stderr)
            return args.fn(args)
    except SnncError as e:
        print(f"snnc {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # disk full, permission denied, a path component that is a file ...
        print(f"snnc {args.command}: error: {e.strerror or e}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except Exception as e:  # a bug: still one line (SNNC_DEBUG=1 shows the traceback)
        import os
        if os.environ.get("SNNC_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"snnc {args.command}: internal error: {type(e).__name__}: {first} (rerun with SNNC_DEBUG=1 for "
              "the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
