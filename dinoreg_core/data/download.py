"""Verified, resumable dataset download: fetch -> verify size/checksum -> extract -> validate -> rename.

Uses only the standard library (``urllib``) for HTTP. What :func:`fetch_dataset` does, for an open manifest:

1. Downloads each archive to ``DEST/.dinoreg-downloads/<archive>.part`` with a tqdm progress bar. If a
   ``.part`` file is already there (an earlier fetch was interrupted), the download resumes with an HTTP
   ``Range: bytes=<size>-`` request; ``If-Range`` carries the ETag / Last-Modified seen the first time, so a
   file that changed on the server is downloaded afresh instead of being spliced. A server that ignores
   Range (answers 200) is read from the start.
2. Verifies the size and the checksum (md5 or sha256, as the manifest states). A mismatching file is deleted.
3. Extracts zip / tar(.gz) archives into a temporary sibling folder ``DEST/.<name>.extracting-*`` (members
   that would land outside it are refused), validates the layout against the manifest (file counts, image
   shapes from the NIfTI headers, pair counts of the Learn2Reg dataset json), writes
   ``.dinoreg-manifest.json`` into it, and only then renames it to ``DEST/<name>``.

On any failure except an interrupted transfer nothing is left in DEST: the temporary folder and the bad
archive are removed. An interrupted transfer keeps its ``.part`` file so the next fetch resumes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path

from tqdm.auto import tqdm

from ..atomic import write_json_atomic
from ..errors import DinoregError
from .manifests import Download, Manifest, parse_manifest

DOWNLOAD_DIR = ".dinoreg-downloads"
MARKER = ".dinoreg-manifest.json"
USER_AGENT = "dinoreg/0.1 (python urllib; research dataset download)"
CHUNK = 1 << 20


@dataclass
class FetchConfig:
    """Options of :func:`fetch_dataset`.

    Attributes:
        retries: how many times an interrupted transfer is resumed automatically within one call
            (0: fail at the first interruption, keeping the partial file for the next call).
        timeout_s: socket timeout per network operation, seconds.
        keep_archive: keep the verified archives in ``DEST/.dinoreg-downloads`` after extraction.
        progress: show tqdm progress bars.
        retry_wait_s: pause before an automatic resume, seconds.
    """

    retries: int = 3
    timeout_s: float = 60.0
    keep_archive: bool = False
    progress: bool = True
    retry_wait_s: float = 2.0


class DownloadInterrupted(DinoregError):
    """The transfer stopped before the end; the partial file is kept and the next fetch resumes it."""


# ------------------------------------------------------------------------------------------ downloading

def _sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _open(url: str, start: int, validator: str | None, timeout: float):
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if start > 0:
        headers["Range"] = f"bytes={start}-"
        if validator:
            headers["If-Range"] = validator
    return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)


def _content_range_start(value: str | None) -> tuple[int | None, int | None]:
    """Parse ``bytes START-END/TOTAL`` -> (START, TOTAL); (None, None) when absent or malformed."""
    if not value or not value.startswith("bytes "):
        return None, None
    try:
        span, total = value[6:].split("/")
        start = int(span.split("-")[0])
        return start, (None if total.strip() == "*" else int(total))
    except ValueError:
        return None, None


def download_file(url: str, part: Path, *, expected_size: int | None = None, cfg: FetchConfig = FetchConfig(),
                  label: str | None = None) -> dict:
    """Download ``url`` into ``part``, resuming from ``part``'s current size with an HTTP Range request.

    Returns a dict with ``bytes_received`` (this call, over all attempts), ``resumed_from`` (size of the
    partial file found at the start) and ``total`` (final size in bytes). Raises :class:`DownloadInterrupted`
    (the partial file is kept) when the transfer stops ``cfg.retries + 1`` times, and :class:`DinoregError`
    for HTTP errors.
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    side = _sidecar(part)
    meta = {}
    if part.exists() and side.exists():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            meta = json.loads(side.read_text())
    if part.exists() and meta.get("url") != url:
        part.unlink()  # a partial file of another URL (or without provenance) cannot be resumed
    resumed_from = part.stat().st_size if part.exists() else 0
    received = 0
    attempt = 0
    label = label or part.name.removesuffix(".part")
    while True:
        start = part.stat().st_size if part.exists() else 0
        if expected_size is not None and start == expected_size:
            return {"bytes_received": received, "resumed_from": resumed_from, "total": start}
        if expected_size is not None and start > expected_size:
            part.unlink()
            start = 0
        try:
            resp = _open(url, start, meta.get("validator"), cfg.timeout_s)
        except urllib.error.HTTPError as e:
            if e.code == 416 and start > 0:  # range not satisfiable: stale partial file; start again
                part.unlink()
                continue
            raise DinoregError(f"The server answered HTTP {e.code} ({e.reason}) for {url}; the manifest URL may be "
                               f"out of date (see the manifest's source field).") from None
        except (urllib.error.URLError, OSError, HTTPException) as e:
            reason = getattr(e, "reason", e)
            if attempt < cfg.retries:
                attempt += 1
                time.sleep(cfg.retry_wait_s)
                continue
            raise DownloadInterrupted(f"Could not reach {url} ({reason}); check the network and run the same "
                                      f"fetch again to resume from byte {start}.") from None
        with resp:
            status = getattr(resp, "status", 200)
            length = resp.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            if status == 206:
                got_start, total = _content_range_start(resp.headers.get("Content-Range"))
                if got_start != start:  # the server sent another range than asked: start again
                    part.unlink(missing_ok=True)
                    continue
                total = total if total is not None else (start + length if length is not None else None)
                mode = "ab"
            else:
                start, total, mode = 0, length, "wb"
            validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
            if mode == "wb" or not meta:
                meta = {"url": url, "validator": validator}
                write_json_atomic(side, meta)
            bar = tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=label,
                       disable=not cfg.progress, leave=False)
            got = 0
            error = None
            try:
                with open(part, mode) as fh:
                    while True:
                        chunk = resp.read(CHUNK)
                        if not chunk:
                            break
                        fh.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
            except (OSError, HTTPException, ValueError) as e:
                error = e
            finally:
                bar.close()
            received += got
        size = part.stat().st_size
        complete = error is None and (total is None or size == total)
        if complete:
            side.unlink(missing_ok=True)
            return {"bytes_received": received, "resumed_from": resumed_from, "total": size}
        if attempt < cfg.retries:
            attempt += 1
            time.sleep(cfg.retry_wait_s)
            continue
        of = f" of {total}" if total is not None else ""
        raise DownloadInterrupted(f"The download of {url} was interrupted after {size}{of} bytes; run the same "
                                  f"fetch again to resume from there.")


def file_digest(path: Path, algorithm: str, *, progress: bool = False) -> str:
    """Hex digest (``md5`` or ``sha256``) of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    size = path.stat().st_size
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, unit_divisor=1024,
                                      desc=f"{algorithm} {path.name}", disable=not progress, leave=False) as bar:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def verify_file(path: Path, dl: Download, manifest_name: str, *, progress: bool = False) -> None:
    """Check ``path`` against the size and checksum of ``dl``; delete it and raise on a mismatch."""
    size = path.stat().st_size
    if dl.size_bytes is not None and size != dl.size_bytes:
        path.unlink()
        raise DinoregError(f"The file {dl.archive} downloaded from {dl.url} has {size} bytes but the manifest "
                           f"'{manifest_name}' expects {dl.size_bytes}; it was deleted.")
    if dl.checksum is not None:
        got = file_digest(path, dl.checksum.algorithm, progress=progress)
        if got != dl.checksum.value:
            path.unlink()
            raise DinoregError(f"The file {dl.archive} downloaded from {dl.url} has {dl.checksum.algorithm} {got} but "
                               f"the manifest '{manifest_name}' expects {dl.checksum.value}; it was deleted.")


# ------------------------------------------------------------------------------------------- extraction

def _safe_target(root: Path, member: str) -> Path | None:
    """Where ``member`` goes under ``root``; None for entries to skip; raises for paths escaping ``root``."""
    name = member.replace("\\", "/")
    if name.startswith("/") or ".." in Path(name).parts or (len(name) > 1 and name[1] == ":"):
        raise DinoregError(f"The archive member {member!r} points outside the extraction folder; refusing to extract.")
    if not name.strip("/") or name.startswith("__MACOSX/"):
        return None
    return root / name


def extract_archive(archive: Path, fmt: str, out_dir: Path, *, progress: bool = False) -> None:
    """Extract ``archive`` (``zip``, ``tar.gz``, ``tar``) into ``out_dir``, or copy it there (``file``).

    Raises :class:`DinoregError` (one sentence naming the archive) for a corrupt or truncated archive.
    """
    try:
        if fmt == "file":
            shutil.copyfile(archive, out_dir / archive.name)
        elif fmt == "zip":
            if not zipfile.is_zipfile(archive):
                raise zipfile.BadZipFile("no zip central directory found")
            with zipfile.ZipFile(archive) as zf:
                for info in tqdm(zf.infolist(), desc=f"extract {archive.name}", disable=not progress, leave=False):
                    target = _safe_target(out_dir, info.filename)
                    if target is None:
                        continue
                    if info.is_dir():
                        target.mkdir(parents=True, exist_ok=True)
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(info) as src, open(target, "wb") as dst:  # reading checks the CRC
                        shutil.copyfileobj(src, dst, CHUNK)
        elif fmt in ("tar.gz", "tar"):
            with tarfile.open(archive, "r:*") as tf:
                for member in tqdm(tf, desc=f"extract {archive.name}", disable=not progress, leave=False):
                    if _safe_target(out_dir, member.name) is None:
                        continue
                    tf.extract(member, out_dir, filter="data")
        else:  # pragma: no cover - the manifest schema only allows the formats above
            raise DinoregError(f"Unknown archive format '{fmt}' for {archive.name}.")
    except DinoregError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, OSError,
            ValueError) as e:
        raise DinoregError(f"The archive {archive.name} is corrupt or truncated and could not be extracted "
                           f"({type(e).__name__}: {e}).") from None


# ------------------------------------------------------------------------------------------- validation

def _nifti_shape(path: Path) -> tuple[int, ...] | None:
    import nibabel as nib

    try:
        return tuple(int(s) for s in nib.load(str(path)).header.get_data_shape())
    except Exception:  # noqa: BLE001 - reported by the caller as a layout problem
        return None


def validate_layout(manifest: Manifest, folder: Path) -> dict:
    """Check an extracted dataset ``folder`` against ``manifest.layout`` (and image shapes, pair counts).

    Returns a summary ``{"files": {pattern: n}, "pairs": {list: n}}``; raises :class:`DinoregError` naming
    the first rule that fails.
    """
    top = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    found_top = ", ".join(top[:8]) + (" ..." if len(top) > 8 else "") if top else "nothing"
    counts = {}
    for rule in manifest.layout.files:
        matches = sorted(p for p in folder.glob(rule.pattern) if p.is_file())
        n = len(matches)
        counts[rule.pattern] = n
        ok = n == rule.count if rule.count is not None else n >= (rule.min_count if rule.min_count is not None else 1)
        if not ok:
            want = f"exactly {rule.count}" if rule.count is not None else f"at least {rule.min_count or 1}"
            raise DinoregError(f"The download of '{manifest.name}' does not have the expected layout: "
                               f"'{rule.pattern}' matched {n} files where {want} were expected (the top level "
                               f"holds: {found_top}).")
        if rule.modality is not None and manifest.image_shape is not None:
            for p in matches:
                shape = _nifti_shape(p)
                if shape is None:
                    raise DinoregError(f"The image {p.relative_to(folder)} of '{manifest.name}' is not a readable "
                                       f"NIfTI file.")
                if shape[:3] != tuple(manifest.image_shape):
                    raise DinoregError(f"The image {p.relative_to(folder)} of '{manifest.name}' has shape "
                                       f"{shape}, but the manifest expects {tuple(manifest.image_shape)}.")
    pairs = {}
    if manifest.layout.dataset_json is not None:
        from ..io import read_l2r_dataset

        jp = folder / manifest.layout.dataset_json
        if not jp.is_file():
            raise DinoregError(f"The download of '{manifest.name}' lacks its dataset file {manifest.layout.dataset_json} "
                               f"(the top level holds: {found_top}).")
        ds = read_l2r_dataset(jp)
        for key, want in manifest.pairs.items():
            n = len(ds.pairs.get(key, []))
            pairs[key] = n
            if (want is not None and n != want) or n == 0:
                raise DinoregError(f"The dataset file {manifest.layout.dataset_json} of '{manifest.name}' lists {n} "
                                   f"'{key}' pairs, but the manifest expects {want if want is not None else 'some'}.")
    return {"files": counts, "pairs": pairs}


# ------------------------------------------------------------------------------------------------ fetch

def dataset_folder(manifest: Manifest, dest: str | os.PathLike) -> Path:
    """The folder ``fetch`` creates for ``manifest`` under ``dest``: ``DEST/<name>``."""
    return Path(dest) / manifest.name


def data_root(manifest: Manifest, dest: str | os.PathLike) -> Path:
    """Where the data proper lives after a fetch: ``DEST/<name>/<layout.data_root>``."""
    return dataset_folder(manifest, dest) / manifest.layout.data_root


PROVENANCE_KEYS = ("fetched", "generated")  # what fetch adds to the manifest copy it leaves in the folder


def read_folder_manifest(folder: str | os.PathLike) -> Manifest | None:
    """The manifest copy that ``fetch`` left in a dataset folder (``.dinoreg-manifest.json``), or None."""
    p = Path(folder) / MARKER
    if not p.is_file():
        return None
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DinoregError(f"The manifest copy {p} is not valid JSON ({e}).") from None
    for k in PROVENANCE_KEYS:
        obj.pop(k, None)
    return parse_manifest(obj, str(p))


def _cleanup_downloads(dl_dir: Path) -> None:
    with contextlib.suppress(OSError):
        dl_dir.rmdir()  # only when empty


def fetch_dataset(manifest: Manifest, dest: str | os.PathLike, cfg: FetchConfig | None = None) -> dict:
    """Download, verify, extract and validate an open dataset into ``DEST/<name>``.

    Returns a summary dict: ``folder`` (the dataset folder), ``data_root``, ``already_present`` (nothing
    was downloaded), ``downloads`` (per archive: bytes received, resumed_from, total) and ``layout`` (file
    and pair counts). Restricted and generated datasets are not fetched here (see the CLI).
    """
    cfg = cfg or FetchConfig()
    if manifest.access != "open":
        raise DinoregError(f"The dataset '{manifest.name}' is {manifest.access}; it cannot be downloaded.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    final = dataset_folder(manifest, dest)
    if final.exists():
        if not (final / MARKER).is_file():
            raise DinoregError(f"The folder {final} already exists and was not made by 'dinoreg data fetch'; move it "
                               f"away or choose another --dest.")
        layout = validate_layout(manifest, final)
        return {"folder": str(final), "data_root": str(data_root(manifest, dest)), "already_present": True,
                "downloads": {}, "layout": layout}

    dl_dir = dest / DOWNLOAD_DIR
    stats = {}
    archives = []
    try:
        for dl in manifest.downloads:
            done = dl_dir / dl.archive
            if not done.exists():
                part = dl_dir / (dl.archive + ".part")
                stats[dl.archive] = download_file(dl.url, part, expected_size=dl.size_bytes, cfg=cfg, label=dl.archive)
                verify_file(part, dl, manifest.name, progress=cfg.progress)
                os.replace(part, done)
            else:
                stats[dl.archive] = {"bytes_received": 0, "resumed_from": done.stat().st_size,
                                     "total": done.stat().st_size}
                verify_file(done, dl, manifest.name, progress=cfg.progress)
            archives.append((done, dl))
    except DownloadInterrupted:
        raise
    except BaseException:
        _cleanup_downloads(dl_dir)
        raise

    tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.name}.extracting-", dir=dest))
    try:
        for path, dl in archives:
            extract_archive(path, dl.format, tmp, progress=cfg.progress)
        layout = validate_layout(manifest, tmp)
        write_json_atomic(tmp / MARKER, {**manifest.to_dict(), "fetched": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "archives": {a.name: stats.get(a.name) for a, _ in archives}}})
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for path, _ in archives:  # a bad archive is not kept (nothing partial stays in DEST)
            path.unlink(missing_ok=True)
        _cleanup_downloads(dl_dir)
        raise
    if not cfg.keep_archive:
        for path, _ in archives:
            path.unlink(missing_ok=True)
        _cleanup_downloads(dl_dir)
    return {"folder": str(final), "data_root": str(data_root(manifest, dest)), "already_present": False,
            "downloads": stats, "layout": layout}
