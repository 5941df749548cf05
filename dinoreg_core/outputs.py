"""A registration's output set, complete or clearly incomplete: staged, then committed by a manifest.

:class:`OutputSet` is what :func:`dinoreg_core.pipeline.write.write` writes through::

    with OutputSet(out, inputs=[fixed_path, moving_path, ...]) as staged:
        ... write every file into staged.dir ...
        files = staged.commit({"displacement": staged.dir / "disp.nii.gz", ...})

The rules (README, reliability section):

* **Staged.** Files are written into a hidden folder ``out/.dinoreg-staging-XXXX`` first; an error or a signal
  while writing (disk full, permission, SIGTERM/SIGINT) removes that folder and leaves ``out`` as it was — an
  earlier complete set stays complete.
* **Committed last.** :meth:`OutputSet.commit` removes the old manifest, moves the staged files into ``out``
  (renames on one file system: they cannot run out of space), removes the files of the *previous set* that the new
  set does not have (so a reused folder holds the new set as a whole, never a mix), and finally writes
  ``outputs.json`` (:data:`MANIFEST`): the files with their sizes and SHA-256. ``outputs.json`` present and every
  checksum matching means the set is complete; absent means incomplete.
* **Swept.** Staging folders and atomic-write temp files left by a killed run (``kill -9`` cannot be caught) are
  removed when the next run starts in that folder.
* **Inputs are never outputs.** A run whose output file would replace one of its input files is refused before
  any work (:func:`check_not_inputs`); the removal of an old set never touches an input.

Only names this project writes are ever removed: the files the old manifest lists, the fixed output names
(:data:`OUTPUT_NAMES`, :data:`L2R_PATTERN`) and the hidden temp names of :mod:`dinoreg_core.atomic`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from .atomic import write_json_atomic
from .errors import DinoregError

MANIFEST = "outputs.json"
MANIFEST_VERSION = 1
STAGING_PREFIX = ".dinoreg-staging-"
OUTPUT_NAMES = ("disp.nii.gz", "warped.nii.gz", "moving_on_fixed_grid.nii.gz", "warped_labels.nii.gz",
                "metrics.json", "config.json", MANIFEST,
                # --export itk (dinoreg_core.export_itk)
                "itk_deformable.nii.gz", "itk_composite.nii.gz", "itk_initial_affine.tfm", "itk_initial_affine.mat")
# the Learn2Reg displacement names: disp_FFFF_MMMM and disp_FFFF_ffff_MMMM_mmmm (case and modality ids)
L2R_PATTERN = re.compile(r"^disp_\d{4}_\d{4}(_\d{4}_\d{4})?\.(nii\.gz|npz)$")
# atomic.atomic_path temp names: "." + stem + "-" + mkstemp's 8 random characters + the full suffix
TEMP_PATTERN = re.compile(r"^\.(?P<stem>[^.]+)-[A-Za-z0-9_]{8}\.(?P<suffix>.+)$")
CHUNK = 1 << 20  # bytes read at a time when hashing


def is_output_name(name: str) -> bool:
    """True for a file name this project writes into a registration's output folder."""
    return name in OUTPUT_NAMES or bool(L2R_PATTERN.match(name))


def sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def check_not_inputs(out: str | os.PathLike, inputs) -> None:
    """Refuse (before any work) a run that would write an output over one of its ``inputs`` (paths or None): an
    input inside ``out`` bearing an output name, or an output name in ``out`` that is (a link to) an input."""
    out = Path(out)
    ins = [Path(p) for p in inputs if p]
    for p in ins:
        if is_output_name(p.name) and p.parent.resolve() == out.resolve():
            raise DinoregError(f"The input {p} would be overwritten by an output of the same name in --out {out}; "
                               f"choose another --out or rename the input.")
    if out.is_dir():
        for name in OUTPUT_NAMES:
            q = out / name
            if any(_same_file(q, p) for p in ins):
                raise DinoregError(f"The output {q} is the same file as an input; choose another --out.")


def check_out_dir(out: str | os.PathLike) -> None:
    """Refuse (before any work, creating nothing) an output folder that cannot be made: a file of that name, a
    file among its parents, or a nearest existing parent that is not writable."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DinoregError(f"The output folder {out} is a file; choose another --out.")
    p = out
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    if p.exists() and not p.is_dir():
        raise DinoregError(f"The output folder {out} cannot be created: {p} is a file.")
    if p.exists() and not os.access(p, os.W_OK | os.X_OK):
        raise DinoregError(f"The output folder {out} cannot be created or written: {p} is not writable.")


def read_manifest(out: str | os.PathLike) -> dict | None:
    """The manifest of ``out`` (None when absent or unreadable)."""
    p = Path(out) / MANIFEST
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("files"), dict) else None


def verify(out: str | os.PathLike) -> str | None:
    """None when ``out`` holds a complete set (manifest present, every listed file with its size and checksum),
    else one sentence saying what is wrong."""
    out = Path(out)
    m = read_manifest(out)
    if m is None:
        return f"{out} has no readable {MANIFEST} (the set is incomplete)"
    for name, rec in m["files"].items():
        p = out / name
        if not p.is_file():
            return f"{p} listed in {MANIFEST} is missing"
        if p.stat().st_size != rec.get("bytes") or sha256(p) != rec.get("sha256"):
            return f"{p} does not match its checksum in {MANIFEST}"
    return None


def _owner_alive(staging_name: str) -> bool:
    """True when the staging folder's name carries the id of a running process other than this one."""
    head = staging_name[len(STAGING_PREFIX):].split("-", 1)[0]
    if not head.isdigit() or int(head) == os.getpid():
        return False
    try:
        os.kill(int(head), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but not ours to signal
        return True
    return True


def sweep(out: str | os.PathLike) -> list[str]:
    """Remove staging folders and atomic temp files of output names left in ``out`` by a killed run (a staging
    folder of a process still running is left alone); returns their names."""
    out = Path(out)
    gone = []
    if not out.is_dir():
        return gone
    for p in out.iterdir():
        if p.name.startswith(STAGING_PREFIX) and p.is_dir() and not p.is_symlink():
            if _owner_alive(p.name):
                continue  # another run writing into this folder right now
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p.name)
            continue
        m = TEMP_PATTERN.match(p.name)
        if m and p.is_file() and is_output_name(f"{m.group('stem')}.{m.group('suffix')}"):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            gone.append(p.name)
    return gone


def sweep_tree(folder: str | os.PathLike) -> list[str]:
    """Remove every atomic-write temp file (hidden, :data:`TEMP_PATTERN`) under ``folder``, a folder this project
    owns (a reproduce run's folders): what a killed run left; returns their paths."""
    gone = []
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink():
        for p in folder.rglob(".*"):
            if TEMP_PATTERN.match(p.name) and p.is_file() and not p.is_symlink():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                gone.append(str(p))
    return gone


class OutputSet:
    """Context manager: a staging folder inside ``out`` for one output set (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, *, inputs=()):
        self.out = Path(out)
        self.inputs = [Path(p) for p in inputs if p]
        self.dir: Path | None = None
        self.committed = False

    def __enter__(self) -> "OutputSet":
        check_not_inputs(self.out, self.inputs)
        sweep(self.out)
        try:
            self.dir = Path(tempfile.mkdtemp(prefix=self._prefix(), dir=self.out))
        except BaseException:  # a signal between mkdtemp and here: no __exit__ will run
            self._remove_own()
            raise
        return self

    def _prefix(self) -> str:
        return f"{STAGING_PREFIX}{os.getpid()}-"

    def _remove_own(self) -> None:
        """Remove this process's staging folders in ``out``."""
        for p in self.out.glob(self._prefix() + "*"):
            shutil.rmtree(p, ignore_errors=True)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.dir is not None and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
        if exc_type is not None:
            self._remove_own()
        if exc_type is not None and issubclass(exc_type, OSError):
            state = "an earlier complete set is kept" if not self.committed and verify(self.out) is None else \
                "the folder holds no complete set (no outputs.json)"
            raise DinoregError(f"Writing the outputs into {self.out} failed ({exc.strerror or type(exc).__name__}); "
                               f"{state}.") from None

    def _is_input(self, p: Path) -> bool:
        return any(_same_file(p, q) for q in self.inputs)

    def commit(self, files: dict) -> dict[str, str]:
        """Move the staged ``files`` ({kind: staged path}) into ``out``, drop the previous set's other files, write
        the manifest last; returns {kind: final path}. SIGTERM and SIGINT wait until the commit is done (it is renames
        and one small file), so a catchable signal never leaves a half-committed set."""
        with _signals_deferred():
            return self._commit(files)

    def _commit(self, files: dict) -> dict[str, str]:
        staged = {k: Path(v) for k, v in files.items()}
        for k, p in staged.items():
            if p.parent != self.dir:
                raise ValueError(f"output {k} ({p}) was not written into the staging folder")
        old = read_manifest(self.out)
        old_names = set(old["files"]) if old else set()
        old_names |= {p.name for p in self.out.iterdir() if p.is_file() and is_output_name(p.name)}
        new_names = {p.name for p in staged.values()}
        (self.out / MANIFEST).unlink(missing_ok=True)  # from here until the end the folder reads as incomplete
        final = {}
        for k, p in staged.items():
            dest = self.out / p.name
            if self._is_input(dest):
                raise DinoregError(f"The output {dest} is the same file as an input; choose another --out.")
            os.replace(p, dest)
            final[k] = dest
        for name in sorted(old_names - new_names - {MANIFEST}):
            q = self.out / name
            if is_output_name(name) and q.is_file() and not q.is_symlink() and not self._is_input(q):
                q.unlink()
        entries = {p.name: {"kind": k, "bytes": p.stat().st_size, "sha256": sha256(p)} for k, p in final.items()}
        write_json_atomic(self.out / MANIFEST, {"version": MANIFEST_VERSION, "complete": True, "files": entries})
        self.committed = True
        return {k: str(v) for k, v in final.items()}  # the manifest is the folder's seal, not one of its outputs


@contextlib.contextmanager
def _signals_deferred():
    """Block SIGTERM and SIGINT in this thread for the block (delivered right after it); a no-op where the platform
    has no signal masks."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def strict_json(obj):
    """``obj`` with every non-finite float (NaN, inf) replaced by None, so ``json.dumps(..., allow_nan=False)``
    writes strict JSON (``null``, never ``NaN``)."""
    import math

    import numpy as np

    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return strict_json(obj.tolist())
    return obj
