"""The ``snnc`` command line. Each subcommand is a ``cmd_<name>(args)`` function plus its
arguments in ``_parser()``; errors from snnc print one line and exit 1 (usage errors exit 2).

    snnc compile MODEL [--convert --calib digits] [--T 8] [--bits 8] --target tvm:llvm [--dump-ir DIR] -o OUT
    snnc inspect FILE|DIR          snnc run OUT --data digits       snnc report MODEL --data digits --T 8 --out DIR
    snnc bench [NAME] [--quick]    snnc nir GRAPH -o FILE.nir        snnc retrain GRAPH --data digits -o OUT
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import subprocess
import sys
from pathlib import Path

from .errors import SnncError

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


# --- argument types: a bad value is a usage error naming the argument (argparse: exit 2) -------

def _shape(text):
    try:
        dims = [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 1,1,8,8") from None
    if not dims or any(d < 1 for d in dims) or math.prod(dims) > MAX_INPUT_ELEMENTS:
        raise argparse.ArgumentTypeError(f"{text!r}: every dim must be >= 1 and the shape at most "
                                         f"{MAX_INPUT_ELEMENTS} elements")
    return dims


def _bits(text):
    v = _positive_int(text)
    if not 2 <= v <= 16:
        raise argparse.ArgumentTypeError(f"{v}: integer weights are 2 to 16 bits wide")
    return v


MAX_INPUT_ELEMENTS = 1 << 28  # an example input larger than 1 GiB of float32 is a typo


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
    module = compile_target(gm, args.target, **tune)
    out = module.export(args.output, overwrite=args.overwrite)
    for name, sec in pm.timings:
        print(f"  {name:<18} {sec * 1e3:8.1f} ms")
    where = f", IR dumps in {args.dump_ir}" if args.dump_ir else ""
    print(f"compiled {args.model} -> {out} (target {args.target}, T={gm.snnc_spec.get('T')}{where})")
    return 0


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


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text):
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    from . import __version__
    p = argparse.ArgumentParser(prog="snnc", description="snnc: a compiler for spiking neural networks")
    p.add_argument("--version", action="version", version=f"snnc {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    def trust_arg(s):
        s.add_argument("--trust-model-file", action="store_true",
                       help="allow reading a pickled torch module / old-format file (a pickle can run code: "
                            "only for files you trust)")

    def model_args(s):
        s.add_argument("model", help="snnc graph file, .nir file, or MODEL.pt: a state_dict (with --model-class) "
                                     "or a torch.save'd module (with --trust-model-file)")
        s.add_argument("--model-class", help="pkg.module:Class built with no arguments, for a state_dict MODEL.pt")
        trust_arg(s)
        s.add_argument("--input-shape", type=_shape, help="example input shape to trace a torch module, e.g. 1,1,8,8")
        s.add_argument("--dt", type=_positive_float, help="time step for NIR time constants (.nir input / nir export)")

    s = sub.add_parser("compile", help="trace/convert/unroll/quantise MODEL and compile it for a target")
    model_args(s)
    s.add_argument("--convert", action="store_true", help="ANN -> SNN conversion (snnc.convert) with --calib data")
    s.add_argument("--calib", help="calibration data: digits or NAME:ROOT")
    s.add_argument("--calib-samples", type=_positive_int, default=512, help="calibration samples (default 512)")
    s.add_argument("--method", choices=("auto", "max", "percentile", "mse", "spiking", "qcfs"),
                   help="threshold balancing method (default auto: the recipe that measures best for --T on "
                        "the calibration data; qcfs: an ANN trained with QCFS activations)")
    s.add_argument("--q", type=float, help="percentile for --method percentile (default 99.9)")
    s.add_argument("--channel-wise", action=argparse.BooleanOptionalAction, default=None,
                   help="one scale per channel instead of per layer")
    s.add_argument("--bias-correction", action=argparse.BooleanOptionalAction, default=None,
                   help="shift biases so each neuron's mean input over T matches the ANN (Li 2021)")
    s.add_argument("--readout-calibration", action=argparse.BooleanOptionalAction, default=None,
                   help="fit the output layer per class to the ANN's logits after T steps, kept if it lowers "
                        "KL on held-out calibration inputs (default: on for the auto recipe)")
    s.add_argument("--max-pool", choices=("lateral", "gate", "spikes", "refuse"),
                   help="how MaxPool2d converts (default lateral: exact max of spike counts, Li 2022; gate: "
                        "Rueckauer 2017; spikes: per-step max of spikes)")
    s.add_argument("--reset", choices=("subtract", "zero"), help="IF reset (default subtract)")
    s.add_argument("--encoding", choices=("direct", "poisson"), help="input coding (default direct)")
    s.add_argument("--scale", type=float, help="multiply every balanced scale (e.g. 0.7, Rathi 2020)")
    s.add_argument("--v-init-fraction", type=float,
                   help="membranes start at this fraction of the threshold (default 0.5 for mse/qcfs, else 0)")
    s.add_argument("--burst", type=_positive_int,
                   help="up to this many spikes per neuron and step (burst spikes, Li 2022; 1 = binary spikes "
                        "only; default: the default recipe may use 4 where binary spikes fall short)")
    s.add_argument("--T-calib", type=_positive_int, help="steps per calibration run of --method spiking (default 32)")
    s.add_argument("--T-target", type=_positive_int, help="the T the scales are tuned / the recipe is chosen for "
                                                "(default --T)")
    s.add_argument("--T", type=_positive_int, help="time steps: unroll the graph to a multi-step graph over T")
    s.add_argument("--bits", type=_bits, help="integer weights of this width (quantize_integer; for tvm:int)")
    s.add_argument("--target", default="torch", help="torch | onnx | tvm:llvm | tvm:cuda | tvm:int (default torch)")
    s.add_argument("--dump-ir", metavar="DIR", help="write the IR after each stage to DIR (see snnc inspect DIR)")
    s.add_argument("--loop", choices=("auto", "unroll", "scan"),
                   help="onnx: write each neuron's loop over T unrolled or as one ONNX Scan (default auto: "
                        "Scan from T=16, where unrolled export time grows with T)")
    s.add_argument("--tune", action="store_true",
                   help="tvm:llvm: MetaSchedule-tune the library's convolutions (database reused next time)")
    s.add_argument("--trials", type=_positive_int, help="--tune: measured schedules per kernel (default 64)")
    s.add_argument("--tune-minutes", type=_positive_float, help="--tune: wall-time budget in minutes (default 10)")
    s.add_argument("--tune-database", metavar="DIR", help="--tune: database folder (default: in the snnc cache)")
    s.add_argument("-o", "--output", required=True, help="the one file to write (any name; metadata inside)")
    s.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    s.set_defaults(fn=cmd_compile)

    s = sub.add_parser("inspect", help="print the IR of a graph/.nir file, or a dump folder's per-pass diffs")
    s.add_argument("path", help="graph file written by snnc.save, a .nir file, or a --dump-ir folder")
    s.add_argument("--full", action="store_true", help="with a folder: print every dump in full, not diffs")
    s.add_argument("--dt", type=_positive_float, help="time step for a .nir file's time constants")
    trust_arg(s)
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("run", help="accuracy and latency of a compiled module on a data set")
    s.add_argument("path", help="compiled artefact (written by snnc compile), graph file or .nir file")
    s.add_argument("--data", default="digits", help="digits or NAME:ROOT (default digits)")
    s.add_argument("--split", default="test", choices=("train", "test"))
    s.add_argument("--T", type=_positive_int, help="time steps (event data sets; unrolls a per-step graph file)")
    s.add_argument("--dt", type=_positive_float, help="time step for a .nir file's time constants")
    s.add_argument("--batch-size", type=_positive_int, default=256)
    s.add_argument("--limit", type=_positive_int, help="use only the first LIMIT samples")
    s.add_argument("--json", action="store_true", help="print one JSON line")
    s.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's own choice)")
    trust_arg(s)
    s.add_argument("--label", help="with --json: a series name (snnc report --bench-json groups by it)")
    s.set_defaults(fn=cmd_run)

    s = sub.add_parser("report", help="firing rates, SOPs vs MACs, energy estimate: table + PNG plots")
    model_args(s)
    s.add_argument("--data", default="digits", help="digits or NAME:ROOT (default digits)")
    s.add_argument("--T", type=_positive_int, default=8, help="time steps for a per-step graph (default 8)")
    s.add_argument("--samples", type=_positive_int, default=256, help="test samples to run (default 256)")
    s.add_argument("--ann", help="the source ANN (torch.save'd module) for its MACs")
    s.add_argument("--bench-json", help="JSON lines from the conversion bench, for the accuracy-vs-T plot")
    s.add_argument("--out", default="snnc_report", help="output folder (default snnc_report)")
    s.add_argument("--overwrite", action="store_true", help="replace report files already in --out")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("bench", help="run the bench/ scripts (JSON lines), or a built-in quick latency bench")
    s.add_argument("name", nargs="?", help="bench script name (bench/NAME.py); all if omitted")
    s.add_argument("--quick", action="store_true", help="short runs")
    s.add_argument("--builtin", action="store_true", help="the built-in latency bench instead of bench/")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("nir", help="export a per-step graph to a NIR file")
    model_args(s)
    s.add_argument("-o", "--output", required=True, help="the .nir file to write")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_nir)

    s = sub.add_parser("retrain", help="fine-tune a graph with surrogate gradients (snnc.retrain)")
    model_args(s)
    s.add_argument("--data", default="digits")
    s.add_argument("--T", type=_positive_int)
    s.add_argument("--epochs", type=_positive_int, default=1)
    s.add_argument("--lr", type=_positive_float, default=1e-3)
    s.add_argument("--batch-size", type=_positive_int, default=64)
    s.add_argument("--surrogate", default="atan", help="surrogate gradient kind (default atan, Fang 2021)")
    s.add_argument("--limit", type=_positive_int, help="train on the first LIMIT samples only")
    s.add_argument("-o", "--output", required=True)
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=cmd_retrain)
    return p


def main(argv=None) -> int:
    parser = _parser()
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
