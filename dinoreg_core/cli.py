"""The ``dinoreg`` command.

Each subcommand lives in its own module under ``dinoreg_core/commands/`` exposing
``add_parser(subparsers)`` (which registers the subcommand and its options, setting ``func``) and the
function it points ``func`` at. Errors meant for users (:class:`DinoregError`) are printed as one
sentence on stderr with exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import DinoregError

# One line per subcommand module.
SUBCOMMANDS = [
    "dinoreg_core.commands.register",
    "dinoreg_core.commands.data",
    "dinoreg_core.commands.demo",
    "dinoreg_core.commands.pretrain",
    "dinoreg_core.commands.reproduce",
    "dinoreg_core.commands.l2r",
    "dinoreg_core.commands.notebooks",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinoreg",
        description="Label-free 3D registration of CT/MR scans with DINO, MIND or intensity features and ConvexAdam.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except DinoregError as e:
        print("dinoreg: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dinoreg: interrupted; finished outputs are kept.", file=sys.stderr)
        return 130
    except MemoryError:
        print("dinoreg: error: out of memory; try a coarser grid (--set grid_sp=...) or a smaller volume.",
              file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
