"""The ``snnc`` command line's arguments: one ``argparse`` parser for every subcommand, and the
argument types that make a bad value a usage error naming the argument (argparse: exit 2).
The commands themselves live in ``snnc.cli``.
"""
from __future__ import annotations

import argparse
import math


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


def build_parser(commands: dict) -> argparse.ArgumentParser:
    """The ``snnc`` argument parser; ``commands`` maps each subcommand name to its ``cmd_<name>(args)``."""
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
    s.add_argument("--spike-digits", choices=("1", "2", "auto"),
                   help="tvm:llvm: int8 weight digits of convs on spikes (default 2; auto: one digit where the "
                        "output spikes on --calib data keep >= 99.9%% agreement with fp32)")
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
    s.set_defaults(fn=commands["compile"])

    s = sub.add_parser("inspect", help="print the IR of a graph/.nir file, or a dump folder's per-pass diffs")
    s.add_argument("path", help="graph file written by snnc.save, a .nir file, or a --dump-ir folder")
    s.add_argument("--full", action="store_true", help="with a folder: print every dump in full, not diffs")
    s.add_argument("--dt", type=_positive_float, help="time step for a .nir file's time constants")
    trust_arg(s)
    s.set_defaults(fn=commands["inspect"])

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
    s.set_defaults(fn=commands["run"])

    s = sub.add_parser("report", help="firing rates, SOPs vs MACs, energy estimate: table + PNG plots")
    model_args(s)
    s.add_argument("--data", default="digits", help="digits or NAME:ROOT (default digits)")
    s.add_argument("--T", type=_positive_int, default=8, help="time steps for a per-step graph (default 8)")
    s.add_argument("--samples", type=_positive_int, default=256, help="test samples to run (default 256)")
    s.add_argument("--ann", help="the source ANN (torch.save'd module) for its MACs")
    s.add_argument("--bench-json", help="JSON lines from the conversion bench, for the accuracy-vs-T plot")
    s.add_argument("--out", default="snnc_report", help="output folder (default snnc_report)")
    s.add_argument("--overwrite", action="store_true", help="replace report files already in --out")
    s.set_defaults(fn=commands["report"])

    s = sub.add_parser("bench", help="run the bench/ scripts (JSON lines), or a built-in quick latency bench")
    s.add_argument("name", nargs="?", help="bench script name (bench/NAME.py); all if omitted")
    s.add_argument("--quick", action="store_true", help="short runs")
    s.add_argument("--builtin", action="store_true", help="the built-in latency bench instead of bench/")
    s.set_defaults(fn=commands["bench"])

    s = sub.add_parser("nir", help="export a per-step graph to a NIR file")
    model_args(s)
    s.add_argument("-o", "--output", required=True, help="the .nir file to write")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=commands["nir"])

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
    s.set_defaults(fn=commands["retrain"])
    return p
