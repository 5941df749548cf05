"""``dinoreg data``: dataset manifests, verified downloads, the synthetic cohort and the pretraining corpus.

Subcommands::

    dinoreg data list [--json]
    dinoreg data show NAME
    dinoreg data fetch NAME --dest DIR [--retries N] [--keep-archive] [--no-progress]
    dinoreg data generate-phantoms --out DIR [--n-subjects N] [--spacing MM] [--shape D H W] [--seed S]
                                   [--workers N] [--set KEY=VALUE ...]
    dinoreg data cohort --role tuning|validation|evaluation --out DIR [--n-subjects N] [--spacing MM]
                        [--shape D H W] [--workers N]
    dinoreg data build-corpus SRC [SRC ...] --out DIR [--spacing MM] [--dtype float16|float32]
                              [--format npy|nifti] [--manifest NAME] [--modality ct|mr] [--no-crop] [--margin-mm MM]

``NAME`` is a built-in manifest name (see ``list``) or the path of a manifest JSON file. ``fetch`` of a
restricted dataset (NAKO) prints how to apply for access and exits with status 2; ``fetch`` of the
synthetic cohort generates it with the manifest's generator parameters.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .. import settings
from ..atomic import write_json_atomic
from ..errors import DinoregError

DEFAULT_ROLE_SUBJECTS = 10  # subjects of a role cohort made by `dinoreg data cohort`


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="list, fetch or generate datasets; build the pretraining corpus",
                              description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    sub.required = True

    q = sub.add_parser("list", help="list the dataset manifests")
    q.add_argument("--json", action="store_true", help="print the manifests as JSON")
    q.set_defaults(func=cmd_list)

    q = sub.add_parser("show", help="print one manifest as JSON")
    q.add_argument("name", help="manifest name or path of a manifest JSON file")
    q.set_defaults(func=cmd_show)

    q = sub.add_parser("fetch", help="download, verify, extract and validate a dataset into DEST/NAME")
    q.add_argument("name", help="manifest name or path of a manifest JSON file")
    q.add_argument("--dest", required=True, help="folder to put the dataset in (DEST/NAME is created)")
    q.add_argument("--retries", type=int, default=3, help="automatic resumes of an interrupted transfer (default 3)")
    q.add_argument("--timeout", type=float, default=60.0, help="network timeout in seconds (default 60)")
    q.add_argument("--keep-archive", action="store_true", help="keep the verified archives in DEST/.dinoreg-downloads")
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    q.set_defaults(func=cmd_fetch)

    q = sub.add_parser("generate-phantoms", help="generate the synthetic abdominal CT/MR cohort")
    q.add_argument("--out", required=True, help="output folder (Learn2Reg layout)")
    q.add_argument("--n-subjects", type=int, default=None, help="number of subjects")
    q.add_argument("--spacing", type=float, default=None,
                   help="voxel spacing in mm; without --shape the default field of view is kept")
    q.add_argument("--shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"), help="grid size in voxels")
    q.add_argument("--seed", type=int, default=None, help="random seed")
    q.add_argument("--workers", type=int, default=None, help="processes generating subjects in parallel")
    q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other PhantomConfig field (value parsed as JSON, else taken as a string)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_generate_phantoms)

    q = sub.add_parser("cohort", help="generate the synthetic cohort of one role (tuning, validation, evaluation), "
                                      "whose seed is fixed by the role (dinoreg_core.data.cohorts)")
    q.add_argument("--role", required=True, help="tuning, validation or evaluation")
    q.add_argument("--out", required=True, help="output folder (Learn2Reg layout)")
    q.add_argument("--n-subjects", type=int, default=DEFAULT_ROLE_SUBJECTS,
                   help=f"number of subjects = inter-patient pairs per task (default {DEFAULT_ROLE_SUBJECTS})")
    q.add_argument("--spacing", type=float, default=None, help="voxel spacing in mm (default 3)")
    q.add_argument("--shape", type=int, nargs=3, default=None, metavar=("D", "H", "W"), help="grid size in voxels")
    q.add_argument("--workers", type=int, default=1, help="processes generating subjects in parallel")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_role_cohort)

    q = sub.add_parser("build-corpus", help="preprocess scans into a cached pretraining corpus with an index")
    q.add_argument("src", nargs="+", help="folders of NIfTI files, fetched dataset folders or *_dataset.json files")
    q.add_argument("--out", required=True, help="corpus folder (index.json, index.csv, volumes/)")
    q.add_argument("--spacing", type=float, default=2.0, help="isotropic voxel spacing in mm (default 2)")
    q.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help=".npy storage type (default float16; NIfTI is always float32)")
    q.add_argument("--format", dest="fmt", choices=["npy", "nifti"], default="npy", help="storage format (default npy)")
    q.add_argument("--manifest", default=None, help="manifest describing the source folder(s)")
    q.add_argument("--modality", choices=["ct", "mr"], default=None, help="force the modality of every scan")
    q.add_argument("--no-crop", action="store_true", help="do not crop to the body bounding box")
    q.add_argument("--margin-mm", type=float, default=8.0, help="margin around the body bounding box (default 8 mm)")
    q.add_argument("--no-progress", action="store_true", help="no progress bar")
    q.set_defaults(func=cmd_build_corpus)


# ------------------------------------------------------------------------------------------------ list

def _size_text(m) -> str:
    sizes = [d.size_bytes for d in m.downloads]
    if not sizes:
        return "-"
    if any(s is None for s in sizes):
        return "?"
    return f"{sum(sizes) / 1e9:.1f} GB"


def cmd_list(args) -> int:
    from ..data.manifests import list_manifests

    ms = list_manifests()
    if args.json:
        print(json.dumps([m.to_dict() for m in ms], indent=2))
        return 0
    rows = [("NAME", "ACCESS", "MODALITIES", "ROLE", "SIZE", "TITLE")]
    for m in ms:
        rows.append((m.name, m.access, "+".join(m.modalities), "+".join(m.role), _size_text(m), m.title))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def cmd_show(args) -> int:
    from ..data.manifests import get_manifest

    print(json.dumps(get_manifest(args.name).to_dict(), indent=2))
    return 0


# ----------------------------------------------------------------------------------------------- fetch

def cmd_fetch(args) -> int:
    from ..data.download import FetchConfig, fetch_dataset
    from ..data.manifests import get_manifest

    m = get_manifest(args.name)
    if m.access == "restricted":
        print(f"The dataset '{m.name}' ({m.title}) is not openly downloadable; access must be requested:\n")
        print(m.how_to_apply)
        if m.homepage:
            print(f"\nHomepage: {m.homepage}")
        print(f"\nOnce you have the data, build the pretraining corpus with:\n"
              f"  dinoreg data build-corpus YOUR_FOLDER --out CORPUS --manifest {m.name}")
        return 2
    if m.access == "generated":
        folder = generate_from_manifest(m, args.dest, progress=not args.no_progress)
        print(f"generated '{m.name}' into {folder}")
        return 0
    if args.retries < 0:
        raise DinoregError(f"--retries must be 0 or more, not {args.retries}.")
    cfg = FetchConfig(retries=args.retries, timeout_s=args.timeout, keep_archive=args.keep_archive,
                      progress=not args.no_progress)
    res = fetch_dataset(m, args.dest, cfg)
    if res["already_present"]:
        print(f"'{m.name}' is already present and valid in {res['folder']}")
    else:
        for name, st in res["downloads"].items():
            resumed = f" (resumed from byte {st['resumed_from']})" if st["resumed_from"] else ""
            print(f"downloaded {name}: {st['total']} bytes{resumed}")
        print(f"fetched '{m.name}' into {res['folder']}")
    for pattern, n in res["layout"]["files"].items():
        print(f"  {pattern}: {n} files")
    for key, n in res["layout"]["pairs"].items():
        print(f"  {key}: {n} pairs")
    print(f"data root: {res['data_root']}")
    return 0


# ----------------------------------------------------------------------------------- synthetic cohort

_OPTION_FIELDS = {"spacing": "spacing_mm"}  # CLI option -> PhantomConfig field


def phantom_config(overrides: dict):
    """A ``dinoreg_core.data.phantom.PhantomConfig`` with ``overrides`` (field name -> value) applied.

    ``spacing`` is accepted for ``spacing_mm``; unknown names raise a :class:`DinoregError` listing the fields.
    Values (strings from ``--set`` or JSON values) are converted to the fields' types by :mod:`dinoreg_core.settings`.
    """
    try:
        phantom = importlib.import_module("dinoreg_core.data.phantom")
        cls = phantom.PhantomConfig
    except (ImportError, AttributeError) as e:
        raise DinoregError(f"The synthetic cohort generator dinoreg_core.data.phantom.PhantomConfig is not available "
                           f"({e}).") from None
    known = [f.name for f in dataclasses.fields(cls)]
    for key in overrides:
        if _OPTION_FIELDS.get(key, key) not in known:
            raise DinoregError(f"PhantomConfig has no field '{key}'; its fields are: {', '.join(known)}.")
    cfg = settings.from_dict(cls, {_OPTION_FIELDS.get(k, k): v for k, v in overrides.items()}, prefix="")
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def _generate(out_dir: Path, overrides: dict, *, progress: bool = True):
    cfg = phantom_config(overrides)
    phantom = importlib.import_module("dinoreg_core.data.phantom")
    return phantom.generate_cohort(out_dir, cfg, progress=progress), cfg


def generate_from_manifest(manifest, dest, *, progress: bool = True) -> Path:
    """Generate a ``generated`` dataset into ``DEST/<name>`` (temporary sibling folder, validated, renamed)."""
    from ..data.download import MARKER, validate_layout

    gen = manifest.generator
    if gen.module != "dinoreg_core.data.phantom" or gen.function != "generate_cohort":
        raise DinoregError(f"The manifest '{manifest.name}' names the generator {gen.module}.{gen.function}; only "
                           f"dinoreg_core.data.phantom.generate_cohort is supported.")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    final = dest / manifest.name
    if final.exists():
        if (final / MARKER).is_file():
            validate_layout(manifest, final)
            return final
        raise DinoregError(f"The folder {final} already exists and was not made by dinoreg; move it away or choose "
                           f"another --dest.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{manifest.name}.generating-", dir=dest))
    try:
        _, cfg = _generate(tmp / manifest.layout.data_root if manifest.layout.data_root else tmp, dict(gen.config),
                           progress=progress)
        validate_layout(manifest, tmp)
        write_json_atomic(tmp / MARKER, {**manifest.to_dict(), "generated": {
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else str(cfg)}})
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def cmd_generate_phantoms(args) -> int:
    overrides = dict(settings.parse_assignments(args.set))
    for key in ("n_subjects", "seed", "workers", "shape"):
        v = getattr(args, key)
        if v is not None:
            overrides[key] = list(v) if key == "shape" else v
    if args.spacing is not None:
        overrides["spacing_mm"] = args.spacing
        if args.shape is None and "shape" not in overrides:  # keep the default field of view
            d = phantom_config({})
            fov = [s * float(d.spacing_mm) for s in d.shape]
            overrides["shape"] = [max(8, int(round(f / args.spacing))) for f in fov]
    out = Path(args.out)
    json_path, cfg = _generate(out, overrides, progress=not args.no_progress)
    grid = "x".join(str(s) for s in cfg.shape)
    print(f"generated {cfg.n_subjects} subjects ({grid} voxels at {cfg.spacing_mm:g} mm) in {out}: {json_path}")
    return 0


def cmd_role_cohort(args) -> int:
    from ..data.cohorts import COHORT_ROLES, generate_role_cohort

    if args.role not in COHORT_ROLES:
        raise DinoregError(f"Unknown cohort role '{args.role}'; choose from {', '.join(COHORT_ROLES)}.")
    if args.n_subjects < 2:
        raise DinoregError(f"--n-subjects {args.n_subjects} must be at least 2 (pairs are between subjects).")
    if args.spacing is not None and not args.spacing > 0:
        raise DinoregError(f"--spacing {args.spacing} must be a positive number of mm.")
    if args.shape is not None and min(args.shape) < 8:
        raise DinoregError(f"--shape {' '.join(map(str, args.shape))} must be at least 8 voxels along every axis.")
    kw = {"workers": max(1, args.workers)}
    if args.spacing is not None:
        kw["spacing_mm"] = args.spacing
    if args.shape is not None:
        kw["shape"] = tuple(args.shape)
    out = Path(args.out)
    json_path = generate_role_cohort(out, args.role, args.n_subjects, progress=not args.no_progress, **kw)
    print(f"generated the {args.role} cohort ({args.n_subjects} subjects) in {out}: {json_path}")
    return 0


# ---------------------------------------------------------------------------------------------- corpus

def cmd_build_corpus(args) -> int:
    from ..data.corpus import CorpusConfig, build_corpus

    cfg = CorpusConfig(spacing_mm=args.spacing, dtype=args.dtype, fmt=args.fmt, crop_foreground=not args.no_crop,
                       margin_mm=args.margin_mm, modality=args.modality, progress=not args.no_progress)
    res = build_corpus(args.src, args.out, cfg, manifest=args.manifest)
    print(f"corpus {res['out']}: {res['entries']} volumes ({res['built']} built, {res['cached']} already cached), "
          f"{len(res['failed'])} failed, {res['ignored']['count']} files ignored, {res['seconds']} s")
    if res["removed_stale"]:
        print(f"  removed {res['removed_stale']} volumes built earlier with other settings")
    for reason, n in res["ignored"]["by_reason"].items():
        print(f"  ignored ({reason}): {n}")
    for f in res["failed"]:
        print(f"  FAILED {f['source']}: {f['error']}", file=sys.stderr)
    return 0
