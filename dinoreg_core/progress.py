"""Stage progress: one log line when a pipeline stage starts and one with its wall time when it ends.

Lines go to the ``dinoreg`` logger at INFO level, so the CLI shows them (``-q`` hides them, ``-v`` adds debug
detail) and library calls stay silent unless the caller configures logging.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("dinoreg")


@contextmanager
def stage(name: str):
    """Log ``name ...`` on entry and ``name done in X s`` on exit (not on error)."""
    log.info("%s ...", name)
    t = time.perf_counter()
    yield
    log.info("%s done in %.1f s", name, time.perf_counter() - t)
