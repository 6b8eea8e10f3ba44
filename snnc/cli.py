"""The ``snnc`` command line. Each subcommand is a ``cmd_<name>(args)`` function plus its
arguments in ``_parser()``; errors from snnc print one line and exit 1 (usage errors exit 2)."""
from __future__ import annotations

import argparse
import difflib
import sys
from pathlib import Path

from .errors import SnncError


def cmd_inspect(args) -> int:
    """Print the IR of a saved graph, or the per-pass dumps of a --dump-ir folder with diffs."""
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
    print(dump(load_graph(path)), end="")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="snnc", description="snnc: a compiler for spiking neural networks")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    s = sub.add_parser("inspect", help="print the IR of a saved graph, or a dump folder's per-pass diffs")
    s.add_argument("path", help="graph file written by snnc.save, or a --dump-ir folder")
    s.add_argument("--full", action="store_true", help="with a folder: print every dump in full, not diffs")
    s.set_defaults(fn=cmd_inspect)
    return p


def main(argv=None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except SnncError as e:
        print(f"snnc {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
