"""The ``dinoreg`` command.

Each subcommand lives in its own module under ``dinoreg_core/commands/`` exposing
``add_parser(subparsers)`` (which registers the subcommand and its options, setting ``func``) and the
function it points ``func`` at. Errors meant for users (:class:`DinoregError`) are printed as one
sentence on stderr with exit status 2; no traceback.

Messages go through the ``dinoreg`` logger (:func:`setup_logging`): progress and status lines (INFO) on stdout,
warnings on stderr; ``-q`` keeps only warnings and errors, ``-v`` adds debug detail. Results a command exists to
print (tables, ``--json``) are printed to stdout regardless.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading

from . import __version__
from .errors import DinoregError

# One line per subcommand module.
SUBCOMMANDS = [
    "dinoreg_core.commands.register",
    "dinoreg_core.commands.data",
    "dinoreg_core.commands.demo",
    "dinoreg_core.commands.pretrain",
    "dinoreg_core.commands.reproduce",
    "dinoreg_core.commands.tune",
    "dinoreg_core.commands.l2r",
    "dinoreg_core.commands.notebooks",
]


class _Below(logging.Filter):
    """Passes records below ``level`` (so INFO goes to stdout and WARNING+ to stderr, not both)."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup_logging(verbosity: int = 0) -> logging.Logger:
    """Configure the ``dinoreg`` logger: ``verbosity`` -1 (``-q``: warnings), 0 (info), 1+ (``-v``: debug)."""
    log = logging.getLogger("dinoreg")
    for h in list(log.handlers):
        log.removeHandler(h)
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    for h in (out, err):
        h.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(h)
    log.setLevel(logging.WARNING if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO)
    return log


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinoreg",
        description="Label-free 3D registration of CT/MR scans with DINO, MIND or intensity features and ConvexAdam.")
    parser.add_argument("--version", action="version", version=f"dinoreg {__version__}")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="only warnings and errors")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more detail (debug messages)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM, so temp files and staging folders are removed as on Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose - args.quiet)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = args.func(args)
    except DinoregError as e:
        print("dinoreg: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"dinoreg: {what}; finished outputs are kept, partial ones removed.", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except OSError as e:  # a read or write the checks could not foresee: disk full, permissions, a vanished file
        where = f" {e.filename}" if getattr(e, "filename", None) else ""
        print(f"dinoreg: error: a file operation failed{where} ({e.strerror or type(e).__name__}); outputs that "
              f"were complete before are kept.", file=sys.stderr)
        return 2
    except MemoryError:
        print("dinoreg: error: out of memory; try a coarser grid (--set grid_sp=...) or a smaller volume.",
              file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(rc or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
