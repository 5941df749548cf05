"""Pretraining corpus builder: NIfTI scans -> a cache of preprocessed volumes with a JSON + CSV index.

Sources (:func:`discover_sources`), any mix of:

* a folder of NIfTI files, searched recursively. Label maps and masks are left out by name (``labels*/``,
  ``masks*/``, ``segmentations/`` folders, ``*label*``, ``*mask*``, ``*_seg*`` files; see
  ``CorpusConfig.exclude``); non-NIfTI files are ignored. The modality of each scan is guessed from its
  intensities (:func:`dinoreg_core.preprocess.guess_modality`) unless ``CorpusConfig.modality`` forces one.
* a folder made by ``dinoreg data fetch`` (it holds ``.dinoreg-manifest.json``) or any folder with an explicit
  manifest: the images and their modalities come from the manifest's layout rules.
* a Learn2Reg ``*_dataset.json`` (or a folder holding exactly one): images from its ``training``/``test``
  lists (or ``imagesTr/``), modality from its ``modality`` table via the ``_XXXX`` channel suffix.

Each scan is loaded in canonical RAS (:func:`dinoreg_core.io.load_volume`), resampled to an isotropic
spacing (:func:`dinoreg_core.preprocess.resample_spacing`, trilinear), cropped to the bounding box of the
body (:func:`dinoreg_core.preprocess.foreground_mask`) plus a margin, and mapped to [0,1]
(:func:`dinoreg_core.preprocess.normalize_intensity`: CT window -1000..1000 HU, MR percentiles). It is stored
as ``volumes/<id>.npy`` (float16 by default, or float32; array axes (D,H,W) canonical RAS) or
``volumes/<id>.nii.gz`` (always float32), next to a sidecar ``volumes/<id>.json`` holding its index entry.
The sidecar is written last, so it marks a finished volume: an interrupted build resumes where it stopped,
and a rerun skips every scan whose sidecar has the same settings and whose source file is unchanged
(size and modification time).

``index.json`` and ``index.csv`` list every cached volume (id, file, source path, dataset, modality, shape,
spacing, ...) and the files of the latest run that could not be used (``failed``: unreadable, corrupt,
constant). Failures are never fatal. Read the corpus with :func:`load_corpus_index` and
:func:`load_corpus_volume` (or :class:`CorpusDataset`).
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io as _io
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_json_atomic, write_text_atomic
from ..errors import DinoregError
from ..io import NIFTI_SUFFIXES, load_volume, save_nifti
from ..preprocess import CT_WINDOW_HU, MR_PERCENTILES, foreground_mask, guess_modality, normalize_intensity, \
    resample_spacing
from .download import read_folder_manifest
from .manifests import Manifest, get_manifest, load_manifest_file

CORPUS_VERSION = 1
DEFAULT_EXCLUDE = ("*labels*/*", "*masks*/*", "*segmentations*/*", "*label*.nii*", "*mask*.nii*", "*_seg.nii*",
                   "*_seg_*.nii*")


@dataclass
class CorpusConfig:
    """Settings of :func:`build_corpus` (the defaults give a 2 mm float16 .npy corpus).

    Attributes:
        spacing_mm: isotropic output voxel size, mm.
        dtype: "float16" or "float32" for .npy volumes (NIfTI volumes are always float32).
        fmt: "npy" or "nifti".
        crop_foreground: crop each volume to the bounding box of its body mask.
        margin_mm: margin kept around the body bounding box, mm.
        modality: force "ct" or "mr" for every scan of folder sources (None: manifest / dataset json / guess).
        exclude: glob patterns (matched against paths relative to a folder source) of NIfTI files to leave
            out (label maps and masks).
        progress: show a tqdm progress bar.
    """

    spacing_mm: float = 2.0
    dtype: str = "float16"
    fmt: str = "npy"
    crop_foreground: bool = True
    margin_mm: float = 8.0
    modality: str | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    progress: bool = True

    def check(self) -> None:
        if not (isinstance(self.spacing_mm, (int, float)) and 0 < self.spacing_mm <= 50):
            raise DinoregError(f"The corpus spacing {self.spacing_mm!r} mm is not valid; give a positive number of mm "
                               f"(e.g. 2).")
        if self.dtype not in ("float16", "float32"):
            raise DinoregError(f"The corpus dtype '{self.dtype}' is not supported; use float16 or float32.")
        if self.fmt not in ("npy", "nifti"):
            raise DinoregError(f"The corpus format '{self.fmt}' is not supported; use npy or nifti.")
        if self.modality not in (None, "ct", "mr"):
            raise DinoregError(f"The modality '{self.modality}' is not supported; use ct or mr.")
        if self.margin_mm < 0:
            raise DinoregError(f"The crop margin {self.margin_mm} mm is negative.")

    def settings(self) -> dict:
        """The settings that determine a cached volume's content (the resume key, without modality)."""
        return {"version": CORPUS_VERSION, "spacing_mm": float(self.spacing_mm),
                "dtype": "float32" if self.fmt == "nifti" else self.dtype, "format": self.fmt,
                "crop_foreground": bool(self.crop_foreground), "margin_mm": float(self.margin_mm),
                "ct_window_hu": list(CT_WINDOW_HU), "mr_percentiles": list(MR_PERCENTILES)}


@dataclass
class SourceItem:
    """One scan to cache: its path, the modality requested for it (None: guess) and where that came from."""

    path: Path
    modality: str | None
    modality_from: str  # "manifest" | "dataset.json" | "forced" | "guessed"
    dataset: str


@dataclass
class CorpusEntry:
    """One cached volume, as listed in ``index.json`` (``path`` is absolute, resolved on load)."""

    id: str
    file: str
    source: str
    dataset: str
    modality: str
    modality_from: str
    shape: list
    spacing_mm: list
    dtype: str
    format: str
    original_shape: list
    original_spacing_mm: list
    affine: list
    crop_box: list
    foreground_fraction: float
    settings_key: str
    source_size: int
    source_mtime: float
    path: str = ""
    extra: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------- discovery

def _is_nifti(p: Path) -> bool:
    return p.name.endswith(NIFTI_SUFFIXES)


def _modality_word(word: str) -> str | None:
    w = str(word).lower()
    if "ct" in w:
        return "ct"
    if "mr" in w or w.startswith("t1") or w.startswith("t2"):
        return "mr"
    return None


def _from_manifest(folder: Path, manifest: Manifest) -> list[SourceItem]:
    rules = manifest.image_rules
    if not rules:
        raise DinoregError(f"The manifest '{manifest.name}' marks no images (no layout rule has a modality), so it "
                           f"cannot feed the corpus builder.")
    items, seen = [], set()
    for rule in rules:
        for p in sorted(folder.glob(rule.pattern)):
            if p.is_file() and p not in seen:
                seen.add(p)
                items.append(SourceItem(p, rule.modality, "manifest", manifest.name))
    return items


def _from_l2r_json(jp: Path, forced: str | None) -> tuple[list[SourceItem], list[dict]]:
    try:
        raw = json.loads(jp.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DinoregError(f"The dataset file {jp} is not valid JSON ({e}).") from None
    name = raw.get("name") or jp.name.replace("_dataset.json", "")
    table = {}
    for k, v in (raw.get("modality") or {}).items():
        m = _modality_word(v)
        if m is not None and str(k).isdigit():
            table[int(k)] = m
    rels = []
    for key in ("training", "test"):
        for item in raw.get(key) or []:
            rel = item.get("image") if isinstance(item, dict) else item
            if isinstance(rel, str):
                rels.append(rel)
    paths = [(jp.parent / r).resolve() for r in rels]
    if not paths:
        paths = sorted((jp.parent / "imagesTr").glob("*.nii*")) + sorted((jp.parent / "imagesTs").glob("*.nii*"))
    items, missing, seen = [], [], set()
    for p in paths:
        if p in seen:
            continue
        seen.add(p)
        if not p.exists():
            missing.append({"source": str(p), "error": f"The image {p} is listed in {jp.name} but does not exist."})
            continue
        m = re.search(r"_(\d{4})\.nii(\.gz)?$", p.name)
        mod = table.get(int(m.group(1))) if m else None
        if forced:
            items.append(SourceItem(p, forced, "forced", name))
        elif mod:
            items.append(SourceItem(p, mod, "dataset.json", name))
        else:
            items.append(SourceItem(p, None, "guessed", name))
    return items, missing


def _excluded(rel: str, patterns) -> str | None:
    for pat in patterns:
        if fnmatch.fnmatch(rel, pat) or fnmatch.fnmatch(rel.lower(), pat):
            return pat
    return None


def discover_sources(src: str | os.PathLike, cfg: CorpusConfig, *, manifest: Manifest | str | None = None,
                     skip_dir: Path | None = None) -> tuple[list[SourceItem], list[dict], dict]:
    """Find the scans of one source (see the module docstring).

    Returns ``(items, missing, ignored)``: scans to cache, failures found already (files a dataset json lists
    but that do not exist) and ``{"count", "by_reason", "examples"}`` of files left out on purpose.
    """
    src = Path(src)
    ignored = {"count": 0, "by_reason": {}, "examples": []}
    if not src.exists():
        raise DinoregError(f"The corpus source {src} does not exist.")
    if isinstance(manifest, str):
        manifest = get_manifest(manifest)
    if src.is_file():
        if src.suffix == ".json":
            if manifest is not None:
                raise DinoregError(f"The corpus source {src} is a JSON file; give the dataset folder when using a "
                                   f"manifest.")
            return (*_from_l2r_json(src, cfg.modality), ignored)
        if _is_nifti(src):
            return [SourceItem(src, cfg.modality, "forced" if cfg.modality else "guessed", src.parent.name)], [], ignored
        raise DinoregError(f"The corpus source {src} is neither a folder, a NIfTI file nor a dataset json.")
    if manifest is None:
        manifest = read_folder_manifest(src)
    if manifest is not None:
        items = _from_manifest(src, manifest)
        if cfg.modality:
            items = [SourceItem(i.path, cfg.modality, "forced", i.dataset) for i in items]
        return items, [], ignored
    jsons = sorted(src.glob("*_dataset.json"))
    if len(jsons) == 1:
        return (*_from_l2r_json(jsons[0], cfg.modality), ignored)

    items = []
    skip = skip_dir.resolve() if skip_dir is not None else None
    for root, dirs, files in os.walk(src):
        rootp = Path(root)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and (skip is None or (rootp / d).resolve() != skip))
        for fname in sorted(files):
            if fname.startswith("."):
                continue
            p = rootp / fname
            rel = p.relative_to(src).as_posix()
            reason = None
            if not _is_nifti(p):
                reason = "not a NIfTI file"
            else:
                pat = _excluded(rel, cfg.exclude)
                if pat:
                    reason = f"excluded by pattern {pat}"
            if reason:
                ignored["count"] += 1
                ignored["by_reason"][reason] = ignored["by_reason"].get(reason, 0) + 1
                if len(ignored["examples"]) < 20:
                    ignored["examples"].append({"source": str(p), "reason": reason})
                continue
            items.append(SourceItem(p, cfg.modality, "forced" if cfg.modality else "guessed", src.name))
    return items, [], ignored


# ---------------------------------------------------------------------------------------- processing

def _volume_id(path: Path) -> str:
    stem = re.sub(r"\.nii(\.gz)?$", "", path.name)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", stem)[:60]
    return f"{stem}-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:8]}"


def _settings_key(settings: dict, modality_request: str | None) -> str:
    blob = json.dumps({**settings, "modality": modality_request or "guess"}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:12]


def _global_key(settings: dict) -> str:
    return hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def preprocess_volume(path: Path, cfg: CorpusConfig, modality: str | None) -> tuple[np.ndarray, dict]:
    """Load, resample, crop and normalise one scan.

    Returns ``(array, info)``: the (D,H,W) float32 array in [0,1] on the cached grid (canonical RAS,
    ``cfg.spacing_mm`` isotropic) and a dict with ``modality``, ``affine`` (4x4 voxel -> world mm of the cached
    grid), ``crop_box`` ([[lo,hi)] x3 in the resampled grid), ``foreground_fraction`` (body voxels / voxels of
    the resampled grid), ``original_shape`` and ``original_spacing_mm`` (canonical orientation).
    Raises :class:`DinoregError` for unreadable, corrupt or constant scans.
    """
    vol = load_volume(path)
    guessed = modality is None
    mod = guess_modality(vol.array) if guessed else modality
    res = resample_spacing(vol, float(cfg.spacing_mm))
    arr = res.array
    box = [[0, s] for s in arr.shape]
    frac = None
    if cfg.crop_foreground:
        mask = foreground_mask(arr, mod)
        frac = float(mask.mean())
        if mask.any():
            margin = int(math.ceil(cfg.margin_mm / cfg.spacing_mm))
            idx = np.nonzero(mask)
            box = [[max(0, int(i.min()) - margin), min(s, int(i.max()) + 1 + margin)] for i, s in zip(idx, arr.shape)]
            arr = arr[tuple(slice(lo, hi) for lo, hi in box)]
    if min(arr.shape) < 2:
        raise DinoregError(f"The scan {path} is only {arr.shape} voxels after resampling to {cfg.spacing_mm} mm and "
                           f"cropping; it is too small for the corpus.")
    try:
        out = normalize_intensity(arr, mod)
    except DinoregError as e:
        raise DinoregError(f"The scan {path} cannot be normalised ({str(e).rstrip('.')}).") from None
    aff = res.affine.copy()
    aff[:3, 3] = res.affine[:3, :3] @ np.array([b[0] for b in box], dtype=np.float64) + res.affine[:3, 3]
    info = {"modality": mod, "affine": aff.tolist(), "crop_box": box, "foreground_fraction": frac,
            "original_shape": list(vol.shape), "original_spacing_mm": [round(s, 6) for s in vol.spacing]}
    return np.ascontiguousarray(out, dtype=np.float32), info


def _save_volume(arr: np.ndarray, affine, cfg: CorpusConfig, path: Path) -> None:
    if cfg.fmt == "npy":
        with atomic_path(path) as tmp:
            np.save(tmp, arr.astype(np.float16 if cfg.dtype == "float16" else np.float32))
    else:
        save_nifti(arr.astype(np.float32), np.asarray(affine), path)


def _cached_entry(side: Path, key: str, src: Path, vol_dir: Path) -> dict | None:
    """The sidecar's entry if it is valid for ``key`` and the source is unchanged, else None."""
    try:
        e = json.loads(side.read_text(encoding="utf-8"))
        st = src.stat()
    except (OSError, json.JSONDecodeError):
        return None
    if (e.get("settings_key") != key or e.get("source_size") != st.st_size
            or abs(float(e.get("source_mtime", -1)) - st.st_mtime) > 1e-3 or not (vol_dir.parent / e["file"]).is_file()):
        return None
    return e


_CSV_COLUMNS = ["status", "id", "file", "source", "dataset", "modality", "modality_from", "shape_d", "shape_h",
                "shape_w", "spacing_d", "spacing_h", "spacing_w", "dtype", "format", "foreground_fraction", "error"]


def _write_index(out: Path, settings: dict, entries: list[dict], failed: list[dict], ignored: dict,
                 summary: dict) -> None:
    write_json_atomic(out / "index.json", {"version": CORPUS_VERSION, "settings": settings, "summary": summary,
                                           "entries": entries, "failed": failed, "ignored": ignored})
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=_CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for e in entries:
        w.writerow({"status": "ok", "id": e["id"], "file": e["file"], "source": e["source"], "dataset": e["dataset"],
                    "modality": e["modality"], "modality_from": e["modality_from"],
                    **{f"shape_{a}": s for a, s in zip("dhw", e["shape"])},
                    **{f"spacing_{a}": s for a, s in zip("dhw", e["spacing_mm"])},
                    "dtype": e["dtype"], "format": e["format"], "foreground_fraction": e["foreground_fraction"],
                    "error": ""})
    for f in failed:
        w.writerow({"status": "failed", "source": f["source"], "dataset": f.get("dataset", ""), "error": f["error"]})
    write_text_atomic(out / "index.csv", buf.getvalue())


def build_corpus(sources, out_dir: str | os.PathLike, cfg: CorpusConfig | None = None, *,
                 manifest: Manifest | str | None = None) -> dict:
    """Build (or update) a preprocessed corpus in ``out_dir`` from one or more sources.

    Args:
        sources: a path or a list of paths (folders, dataset jsons, NIfTI files; see the module docstring).
        out_dir: the corpus folder (created if needed). Volumes built earlier with the same settings are kept
            and skipped; volumes built with other settings are removed from the folder and the index.
        cfg: :class:`CorpusConfig`.
        manifest: a manifest (name, path or object) describing every folder source (default: the copy that
            ``dinoreg data fetch`` leaves in the folder, if any).

    Returns:
        Summary dict: ``built``, ``cached`` (skipped, already built), ``failed`` (list of {source, error}),
        ``ignored`` (count, by_reason, examples), ``entries`` (volumes in the index), ``removed_stale``,
        ``seconds``, ``out``.
    """
    cfg = cfg or CorpusConfig()
    cfg.check()
    t0 = time.time()
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if isinstance(manifest, str):
        manifest = load_manifest_file(manifest) if manifest.endswith(".json") else get_manifest(manifest)
    out = Path(out_dir)
    vol_dir = out / "volumes"
    vol_dir.mkdir(parents=True, exist_ok=True)
    settings = cfg.settings()
    gkey = _global_key(settings)

    items, failed = [], []
    ignored = {"count": 0, "by_reason": {}, "examples": []}
    for s in sources:
        its, missing, ign = discover_sources(s, cfg, manifest=manifest, skip_dir=out)
        items += its
        failed += missing
        ignored["count"] += ign["count"]
        for r, n in ign["by_reason"].items():
            ignored["by_reason"][r] = ignored["by_reason"].get(r, 0) + n
        ignored["examples"] = (ignored["examples"] + ign["examples"])[:20]

    built = cached = 0
    for item in tqdm(items, desc="corpus", unit="scan", disable=not cfg.progress):
        vid = _volume_id(item.path)
        side = vol_dir / f"{vid}.json"
        key = _settings_key(settings, item.modality)
        if side.exists() and _cached_entry(side, key, item.path, vol_dir) is not None:
            cached += 1
            continue
        try:
            arr, info = preprocess_volume(item.path, cfg, item.modality)
        except DinoregError as e:
            failed.append({"source": str(item.path), "dataset": item.dataset, "error": str(e)})
            continue
        except MemoryError:
            failed.append({"source": str(item.path), "dataset": item.dataset,
                           "error": f"The scan {item.path} did not fit in memory."})
            continue
        fname = f"{vid}.npy" if cfg.fmt == "npy" else f"{vid}.nii.gz"
        for old in (vol_dir / f"{vid}.npy", vol_dir / f"{vid}.nii.gz"):
            if old.name != fname:
                old.unlink(missing_ok=True)
        _save_volume(arr, info["affine"], cfg, vol_dir / fname)
        st = item.path.stat()
        entry = {"id": vid, "file": f"volumes/{fname}", "source": str(item.path.resolve()), "dataset": item.dataset,
                 "modality": info["modality"], "modality_from": item.modality_from if item.modality else "guessed",
                 "shape": list(arr.shape), "spacing_mm": [float(cfg.spacing_mm)] * 3, "dtype": settings["dtype"],
                 "format": cfg.fmt, "original_shape": info["original_shape"],
                 "original_spacing_mm": info["original_spacing_mm"], "affine": info["affine"],
                 "crop_box": info["crop_box"], "foreground_fraction": info["foreground_fraction"],
                 "settings_key": key, "global_key": gkey, "source_size": st.st_size, "source_mtime": st.st_mtime}
        write_json_atomic(side, entry)
        built += 1

    # gather every finished volume of this folder (earlier runs and other sources included)
    entries, stale = [], 0
    for side in sorted(vol_dir.glob("*.json")):
        try:
            e = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            e = {}
        if e.get("global_key") != gkey or not (out / e.get("file", "")).is_file():
            stale += 1
            if e.get("file"):
                (out / e["file"]).unlink(missing_ok=True)
            side.unlink(missing_ok=True)
            continue
        entries.append(e)
    entries.sort(key=lambda e: (e["dataset"], e["source"]))
    summary = {"built": built, "cached": cached, "failed": len(failed), "ignored": ignored["count"],
               "entries": len(entries), "removed_stale": stale, "seconds": round(time.time() - t0, 2),
               "sources": [str(Path(s).resolve()) for s in sources],
               "date": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_index(out, settings, entries, failed, ignored, summary)
    return {**summary, "failed": failed, "ignored": ignored, "out": str(out)}


# ------------------------------------------------------------------------------------------------ reading

def load_corpus_index(corpus_dir: str | os.PathLike) -> list[CorpusEntry]:
    """The volumes of a corpus folder (from ``index.json``), each with ``path`` resolved to an absolute file."""
    d = Path(corpus_dir)
    ip = d / "index.json"
    if not ip.is_file():
        raise DinoregError(f"The folder {d} is not a corpus (it has no index.json); build one with "
                           f"'dinoreg data build-corpus'.")
    try:
        idx = json.loads(ip.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DinoregError(f"The corpus index {ip} is not valid JSON ({e}).") from None
    known = {f for f in CorpusEntry.__dataclass_fields__ if f not in ("path", "extra")}
    out = []
    for e in idx.get("entries", []):
        core = {k: v for k, v in e.items() if k in known}
        extra = {k: v for k, v in e.items() if k not in known}
        out.append(CorpusEntry(**core, path=str((d / e["file"]).resolve()), extra=extra))
    return out


def load_corpus_volume(entry: CorpusEntry, *, mmap: bool = False) -> np.ndarray:
    """The cached (D,H,W) volume of ``entry``, intensities in [0,1].

    Returns float32, except with ``mmap=True`` for .npy volumes: then a read-only memory map in the stored
    dtype (float16 or float32), so random crops read only what they need.
    """
    p = Path(entry.path)
    if not p.is_file():
        raise DinoregError(f"The corpus volume {p} is missing; rebuild the corpus.")
    try:
        if entry.format == "npy":
            a = np.load(p, mmap_mode="r" if mmap else None, allow_pickle=False)
            return a if mmap else a.astype(np.float32, copy=False)
        import nibabel as nib

        return np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)
    except (OSError, ValueError, EOFError) as e:
        raise DinoregError(f"The corpus volume {p} could not be read ({e}); rebuild the corpus.") from None


class CorpusDataset:
    """Map-style dataset over a corpus folder: ``ds[i] -> (volume (D,H,W) float32 in [0,1], entry)``.

    Works directly with ``torch.utils.data.DataLoader`` (it only needs ``__len__`` and ``__getitem__``);
    ``modality`` keeps only "ct" or "mr" volumes.
    """

    def __init__(self, corpus_dir: str | os.PathLike, *, modality: str | None = None, mmap: bool = False):
        self.entries = [e for e in load_corpus_index(corpus_dir) if modality is None or e.modality == modality]
        self.mmap = mmap

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int):
        e = self.entries[i]
        return load_corpus_volume(e, mmap=self.mmap), e
