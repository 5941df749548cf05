"""The file protocol of the peer worker scripts (``ants_worker.py``, ``unigradicon_worker.py``).

The workers run in their own Python environments (see :mod:`dinoreg_core.peers._worker`), where dinoreg is not
installed: they import this module from their own folder (``workers/``, which holds no module named like the
packages they import), so it needs only numpy and the standard library.

Request ``IN.npz``: ``fixed``, ``moving`` (D,H,W) float32 on one grid, ``affine`` (4,4) voxel -> RAS mm, ``spec`` (JSON).
Result ``OUT.npz``: ``disp`` (3,D,H,W) float32 fixed voxels, ``warped`` (D,H,W) float32, ``info`` (JSON, with the
worker's peak resident memory ``peak_rss_mb``), written atomically.
"""

from __future__ import annotations

import json
import os

import numpy as np


def read_request(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(fixed, moving, affine, spec) of a request file."""
    with np.load(path) as z:
        return z["fixed"], z["moving"], z["affine"], json.loads(str(z["spec"]))


def peak_rss_mb() -> float | None:
    """This process's peak resident memory (VmHWM, MB), or None where /proc is absent."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024.0 for ln in f if ln.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def write_result(path: str, out: dict) -> None:
    """Write {"disp", "warped", "info"} to ``path`` atomically, adding the peak memory to ``info``."""
    out["info"]["peak_rss_mb"] = peak_rss_mb()
    tmp = path + ".tmp.npz"
    np.savez(tmp, disp=out["disp"], warped=out["warped"], info=np.array(json.dumps(out["info"])))
    os.replace(tmp, path)
