"""Registration presets: the ConvexAdam settings, feature options and ``feature_scale`` of one method, as one JSON.

A preset is a mapping of ``--set`` names to values (``{"lambda_weight": 0.12, "feature_scale": 0.1,
"feat.mind_r": 3, "pca_dim": 12}``); applying it to a :class:`~dinoreg_core.pipeline.config.RegisterConfig` is the
same as passing those ``--set`` values by hand. Every caller (``dinoreg register``, :func:`dinoreg_core.api.register`,
the evaluation runner, the notebooks, the benchmarks) starts from a method's *default* preset; ``--preset`` chooses
another one and ``--set`` overrides single values on top.

Shipped presets (one file per method, ``dinoreg_core/presets/<method>.json``)::

    {"method": "mind", "default": "official",
     "presets": {"official": {"settings": {}, "source": "..."},
                 "authors":  {"settings": {...}, "source": "...", "differs": "..."},
                 "tuned":    {"settings": {...}, "source": "dinoreg tune ...", "search_log": "..."}}}

* ``official`` — the official ConvexAdam MIND defaults (= the code defaults of
  :class:`~dinoreg_core.registration.convex_adam.ConvexAdamConfig`; an empty settings object), for every method;
* ``authors`` — the seed paper's published evaluation settings (EytanKats/med_ssl_3d ``configs/evaluate_*.yaml``)
  mapped onto our ConvexAdam; each entry's ``differs`` says what cannot be mapped exactly;
* ``tuned`` — found by ``dinoreg tune`` (:mod:`dinoreg_core.evaluation.tune`) on the *tuning* cohort only, at 3 mm;
* ``tuned_2mm`` — the same search on the tuning cohort at 2 mm (192x160x256). ConvexAdam's ``disp_hw`` and
  ``grid_sp`` count voxels, so a preset tuned at one spacing covers another extent in mm at another spacing; pick
  the preset of the spacing closest to your scans (each entry's ``spacing_mm`` says which).

How ``authors`` maps the published settings (EytanKats/med_ssl_3d ``configs/evaluate_*.yaml``,
``scripts/evaluate.py``) onto our ConvexAdam, and where it differs:

======== =================================================== ====== ======= ============== ======================
method   features into ConvexAdam                            lambda disp_hw grid_sp / adam Adam
======== =================================================== ====== ======= ============== ======================
dino3d   joint PCA 12 ch, trilinear up, ``feature_scale`` 0.1 0.12   1       6 / 4          1000 it, lr 0.2
dinov2   slices every 6th, 64 tokens (896 px), PCA 12, x 0.4  1      4       6 / 4          1000 it, lr 0.2
mind     MIND-SSC r=3 d=2 (``feat.mind_r/mind_d``), x 3.0     1      1       6 / 4          1000 it, lr 0.2
======== =================================================== ====== ======= ============== ======================

* The authors' Adam stage smooths its parameters with three 3^3 average pools; ours does the same (three 3^3 box
  filters), and our SSD is the channel mean x ``cost_scale`` 12 like the official package, so lambda and lr carry
  over as numbers.
* Our joint PCA whitens the projected channels to unit std; the authors scale the raw ``torch.pca_lowrank``
  projections. The same ``feature_scale`` (0.1, 0.4) is therefore a different absolute feature magnitude, which is
  why ``tuned`` searches ``feature_scale`` as well.
* One preset per method: dino3d's lambda is the NAKO MR-MR value 0.12 (the authors use 0.06 on AbdomenCTCT).
* Inverse consistency stays on (the official default); the configs do not switch it.

A ``dino3d`` preset also travels inside its weights' JSON (``X.json`` beside ``X.safetensors``, key
``registration_presets``: ``{"default": NAME, NAME: {"settings": ..., "source": ...}}``), so weights and their settings
go together: when the weights in use (``feat.weights``, else the demo weights) carry the named preset it is used,
else the package file's.

A preset *file* (``--preset PATH``, what ``dinoreg tune`` writes) is ``{"method": M, "settings": {...}}`` (``method``
optional; when present it must match). Every preset is validated before use: unknown keys, wrong types and
non-finite numbers are refused in one sentence naming the file and the key.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DinoregError

PRESET_DIR = Path(__file__).resolve().parents[1] / "presets"  # dinoreg_core/presets/<method>.json
PRESET_NAMES = ("official", "authors", "tuned", "tuned_2mm")  # tuned_2mm: tuned on the 2 mm tuning cohort
DEFAULT = "default"  # the method's default preset (the "default" entry of its file; "official" without one)
WEIGHTS_KEY = "registration_presets"  # key of the presets inside a dino3d weights JSON
WEIGHTS_METHODS = ("dino3d",)  # methods whose presets may travel inside their weights' JSON


@dataclass
class Preset:
    """One resolved preset: its method, name (or file path), the ``--set`` settings and where they came from."""

    method: str
    name: str
    settings: dict = field(default_factory=dict)
    source: str = ""  # a sentence: the paper, the tune run, ...
    origin: str = ""  # the file the preset was read from


def preset_file(method: str) -> Path:
    """``dinoreg_core/presets/<method>.json`` (the file may be absent: such a method has only ``official``)."""
    return PRESET_DIR / f"{method.replace('+', '_')}.json"


def _read_json(path: Path, what: str) -> dict:
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise DinoregError(f"The {what} {path} cannot be read ({e.__class__.__name__}).") from None
    except json.JSONDecodeError as e:
        raise DinoregError(f"The {what} {path} is not valid JSON ({e.msg}, line {e.lineno}).") from None
    if not isinstance(d, dict):
        raise DinoregError(f"The {what} {path} must hold one JSON object.")
    return d


def package_presets(method: str) -> dict:
    """The parsed package file of ``method`` (``{"method", "default", "presets"}``); an empty file's shape when
    the method ships none."""
    p = preset_file(method)
    if not p.is_file():
        return {"method": method, "default": "official", "presets": {}}
    d = _read_json(p, "preset file")
    if not isinstance(d.get("presets", {}), dict):
        raise DinoregError(f"The preset file {p} has a 'presets' entry that is not an object.")
    return d


def weights_presets(method: str, feature_options: dict | None = None) -> tuple[dict, Path | None]:
    """(``registration_presets`` of the weights' JSON, that JSON's path) for a method whose presets travel with its
    weights (``feat.weights`` in ``feature_options``, else the demo weights); ({}, None) when there are none."""
    if method not in WEIGHTS_METHODS:
        return {}, None
    from ..features.dino3d import DEFAULT_WEIGHTS
    from ..models.checkpoint import checkpoint_paths

    w = (feature_options or {}).get("weights") or DEFAULT_WEIGHTS
    if Path(str(w)).suffix in (".ckpt", ".pt", ".pth"):
        return {}, None
    _, meta = checkpoint_paths(Path(str(w)).expanduser())
    if not meta.is_file():
        return {}, None
    d = _read_json(meta, "weights config").get(WEIGHTS_KEY) or {}
    if not isinstance(d, dict):
        raise DinoregError(f"The '{WEIGHTS_KEY}' entry of {meta} is not an object.")
    return d, meta


def default_preset_name(method: str, feature_options: dict | None = None) -> str:
    """The name of ``method``'s default preset: the weights' JSON ``default``, else the package file's, else
    ``official``."""
    wp, _ = weights_presets(method, feature_options)
    name = wp.get("default") or package_presets(method).get("default") or "official"
    return str(name)


def _entry_settings(entry, where: str) -> tuple[dict, str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("settings", {}), dict):
        raise DinoregError(f"The preset {where} must be an object with a 'settings' object.")
    return dict(entry.get("settings") or {}), str(entry.get("source", ""))


def check_values(settings: dict, where: str) -> None:
    """Refuse non-finite numbers anywhere in ``settings`` (one sentence naming ``where`` and the key)."""
    for k, v in settings.items():
        vals = v if isinstance(v, (list, tuple)) else [v]
        for x in vals:
            if isinstance(x, float) and not math.isfinite(x):
                raise DinoregError(f"The preset {where} sets {k}={x!r}, which is not a finite number.")
            if isinstance(x, str) and x.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
                raise DinoregError(f"The preset {where} sets {k}={x!r}, which is not a finite number.")


def validate(preset: Preset) -> Preset:
    """Check what a preset can be checked for on its own: finite values, no ``features`` / ``init`` (a preset holds
    registration settings only). Keys and types are checked when it is applied
    (:func:`dinoreg_core.pipeline.config.config_from`), in one sentence naming where it came from."""
    check_values(preset.settings, describe(preset))
    if "features" in preset.settings or "init" in preset.settings:
        raise DinoregError(f"The preset {describe(preset)} may not set 'features' or 'init' (a preset holds "
                           f"registration settings only).")
    return preset


def describe(preset: Preset) -> str:
    """``'tuned' of mind (dinoreg_core/presets/mind.json)``: the preset and where it came from, for messages."""
    return f"'{preset.name}' of {preset.method}" + (f" ({preset.origin})" if preset.origin else "")


def from_file(method: str, path) -> Preset:
    """A preset file (``{"method": M, "settings": {...}}``) for ``method``, validated."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DinoregError(f"The preset '{path}' is neither a preset name ({', '.join(PRESET_NAMES)}) nor an "
                           f"existing file.")
    d = _read_json(p, "preset file")
    if d.get("method") not in (None, method):
        raise DinoregError(f"The preset file {p} is for method '{d.get('method')}', not '{method}'.")
    unknown = sorted(set(d) - {"method", "name", "settings", "source", "search_log", "objective", "tuning",
                               "differs", "spacing_mm"})
    if unknown:
        raise DinoregError(f"The preset file {p} has the unknown entry '{unknown[0]}'; expected method, settings "
                           f"(and name, source, search_log, objective, tuning, differs, spacing_mm).")
    settings, source = _entry_settings(d, f"file {p}")
    return validate(Preset(method, str(p), settings, source, str(p)))


def load_preset(method: str, preset: str | None = DEFAULT, feature_options: dict | None = None) -> Preset:
    """The preset ``preset`` of ``method`` (a name of :data:`PRESET_NAMES`, ``default``/None, or a file path),
    validated. ``feature_options`` name the weights whose JSON may carry the preset (dino3d)."""
    name = DEFAULT if preset in (None, "") else str(preset)
    if name == DEFAULT:
        name = default_preset_name(method, feature_options)
    if name not in PRESET_NAMES:
        if name.endswith(".json") or "/" in name or Path(name).expanduser().is_file():
            return from_file(method, name)
        raise DinoregError(f"Unknown preset '{name}'; use one of {', '.join(PRESET_NAMES)} or a preset file path.")
    wp, meta = weights_presets(method, feature_options)
    if name in wp:
        settings, source = _entry_settings(wp[name], f"'{name}' in {meta}")
        return validate(Preset(method, name, settings, source, str(meta)))
    pk = package_presets(method)
    entries = pk.get("presets") or {}
    if name in entries:
        settings, source = _entry_settings(entries[name], f"'{name}' in {preset_file(method)}")
        return validate(Preset(method, name, settings, source, str(preset_file(method))))
    if name == "official":
        return Preset(method, "official", {}, "the official ConvexAdam MIND defaults (code defaults)", "")
    have = ", ".join(available_presets(method, feature_options))
    raise DinoregError(f"The method '{method}' has no '{name}' preset; it has: {have}.")


def preset_settings(method: str, preset: str | None = DEFAULT, feature_options: dict | None = None) -> dict:
    """Just the ``--set`` settings of :func:`load_preset`."""
    return dict(load_preset(method, preset, feature_options).settings)


def available_presets(method: str, feature_options: dict | None = None) -> list[str]:
    """Names of the presets ``method`` has (``official`` always)."""
    wp, _ = weights_presets(method, feature_options)
    names = {"official"} | set((package_presets(method).get("presets") or {})) | {k for k in wp if k != "default"}
    return [n for n in PRESET_NAMES if n in names] + sorted(names - set(PRESET_NAMES))


def write_preset_file(path, method: str, settings: dict, *, source: str = "", extra: dict | None = None) -> Path:
    """Write a preset file (``{"method", "settings", "source", ...}``) atomically; returns its path."""
    from ..atomic import write_json_atomic

    check_values(settings, f"to be written to {path}")
    d = {"method": method, "settings": dict(settings), "source": source, **(extra or {})}
    write_json_atomic(Path(path), d)
    return Path(path)


def install_preset(preset_path, *, name: str = "tuned", make_default: bool = False, weights_json=None) -> Path:
    """Copy a preset file (what ``dinoreg tune`` wrote) into its method's package file as ``name`` (and, with
    ``weights_json``, into that weights JSON's ``registration_presets``); returns the package file's path."""
    from ..atomic import write_json_atomic

    d = _read_json(Path(preset_path), "preset file")
    method = d.get("method")
    if not method:
        raise DinoregError(f"The preset file {preset_path} names no method.")
    p = from_file(method, preset_path)
    entry = {"settings": p.settings, "source": p.source}
    for k in ("objective", "tuning", "spacing_mm"):
        if k in d:
            entry[k] = d[k]
    pk = package_presets(method)
    pk.setdefault("presets", {})[name] = entry
    if make_default:
        pk["default"] = name
    write_json_atomic(preset_file(method), pk)
    if weights_json is not None:
        wj = Path(weights_json)
        meta = _read_json(wj, "weights config")
        wp = meta.get(WEIGHTS_KEY) or {}
        wp[name] = {k: v for k, v in entry.items() if k in ("settings", "source", "spacing_mm")}
        if make_default:
            wp["default"] = name
        meta[WEIGHTS_KEY] = wp
        write_json_atomic(wj, meta)
    return preset_file(method)
