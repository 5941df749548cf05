"""Running a peer's worker script in another Python (a separate virtual environment) and finding that Python.

Some peers cannot share this environment: antspyx pins numpy < 2.4 / scipy < 1.16, and uniGradICON pulls its own
torch/torchvision. Their work runs in a subprocess whose interpreter is found by :func:`find_python`; arrays go
in and out through ``.npz`` files in a temporary folder.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ..errors import DinoregError

REPO = Path(__file__).resolve().parents[2]
PEERS_VENV = REPO / ".venv-peers"


@functools.lru_cache(maxsize=None)
def python_has(python: str, probe: tuple[str, ...]) -> bool:
    """Whether ``python probe...`` (e.g. ``("-c", "import ants")``) exits with status 0."""
    try:
        r = subprocess.run([python, *probe], capture_output=True, timeout=600, cwd=tempfile.gettempdir())
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def find_python(module: str, env_var: str, probe: tuple[str, ...] | None = None) -> tuple[str | None, list[str]]:
    """The first interpreter that imports ``module``: ``$env_var`` (only it, when set), else this Python, else
    ``.venv-peers/bin/python`` in the repository. ``probe`` (arguments after the interpreter) replaces the plain
    ``-c "import module"`` test. Returns (path or None, the places tried)."""
    probe = tuple(probe) if probe else ("-c", f"import {module}")
    tried = []
    env = os.environ.get(env_var)
    if env:
        tried.append(f"${env_var}={env}")
        return (env if Path(env).exists() and python_has(env, probe) else None), tried
    for c in (sys.executable, str(PEERS_VENV / "bin" / "python")):
        tried.append(c)
        if Path(c).exists() and python_has(c, probe):
            return c, tried
    return None, tried


def run_worker(python: str, script: Path, arrays: dict, spec: dict, *, what: str, threads: int | None = None,
               timeout_s: float | None = None, env: dict | None = None) -> tuple[dict, dict]:
    """Run ``python script IN.npz OUT.npz`` and return (arrays of OUT.npz, info dict).

    ``arrays`` go into IN.npz together with ``spec`` (as a JSON string). ``threads`` sets the thread count of
    ITK, OpenMP and MKL in the child. The worker reports its own peak memory as ``info["peak_rss_mb"]``
    (see :func:`own_peak_rss_mb`). Failures raise :class:`DinoregError` quoting the child's last error line.
    """
    child_env = {**os.environ, **(env or {})}
    if threads:
        for k in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            child_env[k] = str(int(threads))
    with tempfile.TemporaryDirectory(prefix="dinoreg_peer_") as tmp:
        src, dst = Path(tmp) / "in.npz", Path(tmp) / "out.npz"
        np.savez(src, spec=np.array(json.dumps(spec)), **arrays)
        try:
            r = subprocess.run([python, str(script), str(src), str(dst)], capture_output=True, text=True,
                               env=child_env, timeout=timeout_s, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise DinoregError(f"The {what} run did not finish within {timeout_s:.0f} s.") from None
        if r.returncode != 0 or not dst.exists():
            lines = [ln.strip() for ln in (r.stderr or r.stdout or "").splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit status {r.returncode}"
            raise DinoregError(f"The {what} run failed in {python} ({last}).")
        with np.load(dst) as z:
            out = {k: z[k] for k in z.files if k != "info"}
            info = json.loads(str(z["info"])) if "info" in z.files else {}
    if info.get("peak_rss_mb") is None:  # the worker could not read its own high-water mark
        info["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return out, info


def own_peak_rss_mb() -> float:
    """Peak resident memory of this process in MB: ``VmHWM`` of /proc/self/status (Linux).

    Unlike ``ru_maxrss``, which Linux carries over from the parent through fork and exec (a child started by a
    big process reports at least the parent's size), VmHWM starts afresh with the new program. Elsewhere falls
    back to ``ru_maxrss``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20
