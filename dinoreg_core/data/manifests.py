"""Dataset manifests: what a dataset is, where it comes from, and what a good download looks like.

A manifest is a JSON file validated by :func:`parse_manifest` (the schema lives in this module, as
dataclasses plus explicit checks; no third-party schema library). The built-in manifests ship inside the
package, in ``dinoreg_core/data/manifests/*.json``, so they are available after a plain ``pip install``;
the top-level ``data_manifests/`` folder of the repository only holds a README pointing here.

Schema (every key below; unknown keys are rejected so typos do not pass silently)::

    name          str, [a-z0-9_]+ : the name used on the command line (``dinoreg data fetch NAME``)
    title         str             : human-readable title
    description   str
    access        "open" | "restricted" | "generated"
    role          list of "evaluation" | "pretraining"
    modalities    list of "ct" | "mr"
    license       str             : licence as stated by the provider (or "unknown")
    homepage      str (URL) | null
    source        list[str], non-empty : where each fact came from (URL or repository:path + the fact)
    downloads     list of {url, archive, format: zip|tar.gz|tar|file, size_bytes: int|null,
                           checksum: {algorithm: md5|sha256, value: hex} | null}
                  (non-empty for "open"; empty for "restricted" and "generated")
    how_to_apply  str | null      : required for "restricted" (how to request access)
    layout        {data_root: str, dataset_json: str|null,
                   files: list of {pattern: glob, count: int|null, min_count: int|null, modality: ct|mr|null}}
                  Paths are relative to the folder ``fetch`` creates (``DEST/<name>/``), i.e. to the
                  archives' extracted contents as they are. ``data_root`` is the folder holding the data
                  proper (e.g. ``AbdomenCTCT``); a ``files`` rule with a ``modality`` marks images, which the
                  corpus builder reads with that modality.
    image_shape   [i,j,k] | null  : voxel grid as stored in the NIfTI header (checked on fetch)
    spacing_mm    [si,sj,sk] | null
    labels        {"<id>": "<name>"} (ids > 0)
    pairs         {"<pair list in the dataset json>": expected count | null}
    evaluation    {metrics: list[str], masked: bool} | null
    generator     {module, function, config: {...}} | null : required for "generated"
    notes         str

Checksums are never guessed: ``null`` when the provider does not publish one.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import DinoregError

MANIFEST_DIR = Path(__file__).resolve().parent / "manifests"

ACCESS = ("open", "restricted", "generated")
ROLES = ("evaluation", "pretraining")
MODALITIES = ("ct", "mr")
FORMATS = ("zip", "tar.gz", "tar", "file")
HASH_LENGTHS = {"md5": 32, "sha256": 64}
_NAME_RE = re.compile(r"^[a-z0-9_]+$")
_HEX_RE = re.compile(r"^[0-9a-f]+$")


@dataclass(frozen=True)
class Checksum:
    """A published checksum of one downloaded file (lower-case hex)."""

    algorithm: str
    value: str


@dataclass(frozen=True)
class Download:
    """One file to download: ``url`` saved as ``archive``, then extracted according to ``format``."""

    url: str
    archive: str
    format: str
    size_bytes: int | None = None
    checksum: Checksum | None = None


@dataclass(frozen=True)
class FileRule:
    """Files the extracted dataset must contain: ``pattern`` (glob, relative to the dataset folder).

    ``count`` is an exact number, ``min_count`` a lower bound (neither: at least one). ``modality`` marks
    the matches as images of that modality (used by the corpus builder).
    """

    pattern: str
    count: int | None = None
    min_count: int | None = None
    modality: str | None = None


@dataclass(frozen=True)
class Layout:
    data_root: str = ""
    dataset_json: str | None = None
    files: tuple[FileRule, ...] = ()


@dataclass(frozen=True)
class Evaluation:
    metrics: tuple[str, ...] = ()
    masked: bool = False


@dataclass(frozen=True)
class Generator:
    module: str
    function: str
    config: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Manifest:
    """A validated dataset manifest (see the module docstring for the meaning of each field)."""

    name: str
    title: str
    description: str
    access: str
    role: tuple[str, ...]
    modalities: tuple[str, ...]
    license: str
    source: tuple[str, ...]
    homepage: str | None = None
    downloads: tuple[Download, ...] = ()
    how_to_apply: str | None = None
    layout: Layout = Layout()
    image_shape: tuple[int, int, int] | None = None
    spacing_mm: tuple[float, float, float] | None = None
    labels: dict = field(default_factory=dict)
    pairs: dict = field(default_factory=dict)
    evaluation: Evaluation | None = None
    generator: Generator | None = None
    notes: str = ""
    path: str | None = None  # the file it was read from (not part of the JSON)

    def to_dict(self) -> dict:
        """The manifest as a JSON-ready dict (the inverse of :func:`parse_manifest`)."""
        d = asdict(self)
        d.pop("path")
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        return d

    @property
    def image_rules(self) -> list[FileRule]:
        """Layout rules that mark images (rules with a modality)."""
        return [r for r in self.layout.files if r.modality is not None]


# ------------------------------------------------------------------------------------------- validation

_TOP_KEYS = {"name", "title", "description", "access", "role", "modalities", "license", "homepage", "source",
             "downloads", "how_to_apply", "layout", "image_shape", "spacing_mm", "labels", "pairs", "evaluation",
             "generator", "notes"}
_REQUIRED = ("name", "title", "description", "access", "role", "modalities", "license", "source", "layout")


class _Checker:
    """Collects the context (manifest file) so every failure is one sentence naming file and field."""

    def __init__(self, where: str):
        self.where = where

    def fail(self, key: str, problem: str):
        raise DinoregError(f"The manifest {self.where} is invalid: '{key}' {problem}.")

    def keys(self, obj, allowed: set, required, key: str):
        if not isinstance(obj, dict):
            self.fail(key, "must be a JSON object")
        unknown = sorted(set(obj) - allowed)
        if unknown:
            self.fail(key, f"has unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")
        for r in required:
            if r not in obj:
                self.fail(f"{key}.{r}" if key else r, "is missing")

    def string(self, v, key: str, *, empty_ok=False, null_ok=False):
        if v is None and null_ok:
            return None
        if not isinstance(v, str) or (not empty_ok and not v.strip()):
            self.fail(key, "must be a non-empty string" + (" or null" if null_ok else ""))
        return v

    def choice(self, v, options, key: str, *, null_ok=False):
        if v is None and null_ok:
            return None
        if v not in options:
            self.fail(key, f"is {v!r}; expected one of {', '.join(map(repr, options))}" + (" or null" if null_ok else ""))
        return v

    def str_list(self, v, key: str, options=None, *, non_empty=True):
        if not isinstance(v, list) or (non_empty and not v):
            self.fail(key, "must be a non-empty list" if non_empty else "must be a list")
        return tuple(self.choice(x, options, f"{key}[{i}]") if options else self.string(x, f"{key}[{i}]")
                     for i, x in enumerate(v))

    def int_or_null(self, v, key: str, *, minimum=0):
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            self.fail(key, f"must be an integer >= {minimum} or null")
        return v

    def triple(self, v, key: str, kind):
        if v is None:
            return None
        if (not isinstance(v, list) or len(v) != 3
                or any(isinstance(x, bool) or not isinstance(x, (int, float)) or x <= 0 for x in v)
                or (kind is int and any(not isinstance(x, int) for x in v))):
            self.fail(key, f"must be a list of three positive {'integers' if kind is int else 'numbers'} or null")
        return tuple(kind(x) for x in v)

    def url(self, v, key: str, *, null_ok=False):
        if v is None and null_ok:
            return None
        self.string(v, key)
        if not re.match(r"^https?://\S+$", v):
            self.fail(key, f"is {v!r}; expected an http:// or https:// URL")
        return v

    def rel_path(self, v, key: str, *, empty_ok=False):
        self.string(v, key, empty_ok=empty_ok)
        if v.startswith(("/", "\\")) or ".." in Path(v).parts or re.match(r"^[A-Za-z]:", v):
            self.fail(key, f"is {v!r}; it must be a relative path inside the dataset folder")
        return v


def parse_manifest(obj: dict, where: str = "<manifest>") -> Manifest:
    """Validate a manifest dict against the schema and return a :class:`Manifest`.

    Raises :class:`DinoregError` with one sentence naming ``where`` and the offending field.
    """
    c = _Checker(where)
    c.keys(obj, _TOP_KEYS, (), "")
    for r in _REQUIRED:
        if r not in obj:
            c.fail(r, "is missing")
    name = c.string(obj["name"], "name")
    if not _NAME_RE.match(name):
        c.fail("name", f"is {name!r}; use lower-case letters, digits and underscores only")
    access = c.choice(obj["access"], ACCESS, "access")

    downloads = []
    raw_dl = obj.get("downloads", [])
    if not isinstance(raw_dl, list):
        c.fail("downloads", "must be a list")
    for i, d in enumerate(raw_dl):
        k = f"downloads[{i}]"
        c.keys(d, {"url", "archive", "format", "size_bytes", "checksum"}, ("url", "archive", "format"), k)
        archive = c.string(d["archive"], f"{k}.archive")
        if "/" in archive or "\\" in archive or archive.startswith("."):
            c.fail(f"{k}.archive", f"is {archive!r}; it must be a plain file name")
        checksum = None
        if d.get("checksum") is not None:
            ck = d["checksum"]
            c.keys(ck, {"algorithm", "value"}, ("algorithm", "value"), f"{k}.checksum")
            alg = c.choice(ck["algorithm"], tuple(HASH_LENGTHS), f"{k}.checksum.algorithm")
            val = c.string(ck["value"], f"{k}.checksum.value")
            if len(val) != HASH_LENGTHS[alg] or not _HEX_RE.match(val):
                c.fail(f"{k}.checksum.value", f"must be {HASH_LENGTHS[alg]} lower-case hex digits for {alg}")
            checksum = Checksum(alg, val)
        downloads.append(Download(
            url=c.url(d["url"], f"{k}.url"), archive=archive, format=c.choice(d["format"], FORMATS, f"{k}.format"),
            size_bytes=c.int_or_null(d.get("size_bytes"), f"{k}.size_bytes", minimum=1), checksum=checksum))
    if len({d.archive for d in downloads}) != len(downloads):
        c.fail("downloads", "names the same archive file twice")

    how = c.string(obj.get("how_to_apply"), "how_to_apply", null_ok=True)
    if access == "open" and not downloads:
        c.fail("downloads", "must list at least one download for an open dataset")
    if access != "open" and downloads:
        c.fail("downloads", f"must be empty for a {access} dataset")
    if access == "restricted" and not how:
        c.fail("how_to_apply", "must say how to request access for a restricted dataset")

    gen = None
    if obj.get("generator") is not None:
        g = obj["generator"]
        c.keys(g, {"module", "function", "config"}, ("module", "function"), "generator")
        cfg = g.get("config", {})
        if not isinstance(cfg, dict):
            c.fail("generator.config", "must be a JSON object")
        gen = Generator(c.string(g["module"], "generator.module"), c.string(g["function"], "generator.function"),
                        dict(cfg))
    if access == "generated" and gen is None:
        c.fail("generator", "is required for a generated dataset")

    lay = obj["layout"]
    c.keys(lay, {"data_root", "dataset_json", "files"}, ("files",), "layout")
    rules = []
    if not isinstance(lay["files"], list):
        c.fail("layout.files", "must be a list")
    for i, f in enumerate(lay["files"]):
        k = f"layout.files[{i}]"
        c.keys(f, {"pattern", "count", "min_count", "modality"}, ("pattern",), k)
        cnt = c.int_or_null(f.get("count"), f"{k}.count")
        mn = c.int_or_null(f.get("min_count"), f"{k}.min_count")
        if cnt is not None and mn is not None:
            c.fail(k, "gives both count and min_count; give one")
        rules.append(FileRule(c.rel_path(f["pattern"], f"{k}.pattern"), cnt, mn,
                              c.choice(f.get("modality"), MODALITIES, f"{k}.modality", null_ok=True)))
    if access == "open" and not rules:
        c.fail("layout.files", "must list the files a good download contains")
    dj = lay.get("dataset_json")
    layout = Layout(c.rel_path(lay.get("data_root", ""), "layout.data_root", empty_ok=True),
                    None if dj is None else c.rel_path(dj, "layout.dataset_json"), tuple(rules))

    labels = obj.get("labels", {})
    if not isinstance(labels, dict):
        c.fail("labels", "must be a JSON object of id -> name")
    parsed_labels = {}
    for k_, v in labels.items():
        if not re.match(r"^[0-9]+$", str(k_)) or int(k_) <= 0:
            c.fail(f"labels.{k_}", "is not a positive integer label id (0 is background and is not listed)")
        parsed_labels[int(k_)] = c.string(v, f"labels.{k_}")

    pairs = obj.get("pairs", {})
    if not isinstance(pairs, dict):
        c.fail("pairs", "must be a JSON object of pair-list name -> expected count (or null)")
    pairs = {k_: c.int_or_null(v, f"pairs.{k_}", minimum=1) for k_, v in pairs.items()}
    if pairs and layout.dataset_json is None:
        c.fail("pairs", "needs layout.dataset_json (the file that lists the pairs)")

    ev = None
    if obj.get("evaluation") is not None:
        e = obj["evaluation"]
        c.keys(e, {"metrics", "masked"}, ("metrics",), "evaluation")
        masked = e.get("masked", False)
        if not isinstance(masked, bool):
            c.fail("evaluation.masked", "must be true or false")
        ev = Evaluation(c.str_list(e["metrics"], "evaluation.metrics"), masked)

    source = c.str_list(obj["source"], "source")
    return Manifest(
        name=name, title=c.string(obj["title"], "title"), description=c.string(obj["description"], "description"),
        access=access, role=c.str_list(obj["role"], "role", ROLES),
        modalities=c.str_list(obj["modalities"], "modalities", MODALITIES),
        license=c.string(obj["license"], "license"), source=source,
        homepage=c.url(obj.get("homepage"), "homepage", null_ok=True), downloads=tuple(downloads), how_to_apply=how,
        layout=layout, image_shape=c.triple(obj.get("image_shape"), "image_shape", int),
        spacing_mm=c.triple(obj.get("spacing_mm"), "spacing_mm", float), labels=parsed_labels, pairs=pairs,
        evaluation=ev, generator=gen, notes=c.string(obj.get("notes", ""), "notes", empty_ok=True), path=where)


# ----------------------------------------------------------------------------------------------- loading

def load_manifest_file(path: str | os.PathLike) -> Manifest:
    """Read and validate one manifest JSON file."""
    p = Path(path)
    if not p.is_file():
        raise DinoregError(f"The manifest file {p} does not exist.")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DinoregError(f"The manifest file {p} is not valid JSON ({e}).") from None
    m = parse_manifest(obj, str(p))
    if p.parent.resolve() == MANIFEST_DIR and p.stem != m.name:
        raise DinoregError(f"The manifest file {p} declares the name '{m.name}'; built-in manifests must be "
                           f"named <name>.json.")
    return m


def builtin_manifest_paths() -> list[Path]:
    """The built-in manifest files, sorted by name."""
    return sorted(MANIFEST_DIR.glob("*.json"))


def list_manifests() -> list[Manifest]:
    """All built-in manifests, validated, sorted by name."""
    return [load_manifest_file(p) for p in builtin_manifest_paths()]


def get_manifest(name_or_path: str | os.PathLike) -> Manifest:
    """A built-in manifest by name, or any manifest by the path of its JSON file."""
    s = str(name_or_path)
    if s.endswith(".json") or os.sep in s or "/" in s:
        return load_manifest_file(s)
    p = MANIFEST_DIR / f"{s}.json"
    if not p.is_file():
        names = ", ".join(q.stem for q in builtin_manifest_paths())
        raise DinoregError(f"There is no dataset manifest named '{s}'; known datasets: {names}.")
    return load_manifest_file(p)
