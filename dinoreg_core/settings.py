"""One settings mechanism: ``key=value`` overrides, dotted keys and JSON files into dataclasses, strictly.

Every command, the notebooks' ``parameters`` and the presets go through these functions, so a value means the
same thing everywhere:

* :func:`parse_assignments` — ``["grid_sp=4", "convex.lr=0.5"]`` -> ``[("grid_sp", "4"), ("convex.lr", "0.5")]``;
* :func:`apply` — set dotted keys on a dataclass instance, converting each value to the field's declared type;
* :func:`from_dict` — build a dataclass from a (JSON) dict, nested dataclasses included;
* :func:`load_file` — read a JSON (or YAML) object of settings;
* :func:`parse_literal` — the value of an *untyped* entry (a free-form options dict): JSON where it parses
  (``4``, ``0.5``, ``true``, ``null``, ``[1, 2]``, ``{"a": 1}``), ``none`` as None, else the string itself.

Rules (the same for every caller):

* an unknown key is an error naming the known ones; a key may address a nested dataclass field
  (``convex.grid_sp``) or an entry of a dict field (``feature_options.mind_r``);
* booleans are ``true/false/1/0/yes/no/on/off`` (any case) or JSON booleans; anything else is an error;
* integers accept integral numbers (``4``, ``4.0``, ``"1e4"``), floats any finite number: ``nan`` and ``inf`` are
  refused (no setting of this project means them);
* ``X | None`` fields accept ``none`` / ``null``; tuple and list fields accept a JSON list or ``a,b,c``;
* every error is a :class:`~dinoreg_core.errors.DinoregError` of one sentence naming the key and the value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping

from .errors import DinoregError

TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off")
NONE_WORDS = ("none", "null")


def parse_assignments(items: Iterable[str] | None) -> list[tuple[str, str]]:
    """``KEY=VALUE`` strings -> (key, value) pairs, both stripped; an item without ``=`` is an error."""
    out = []
    for s in items or []:
        if "=" not in s:
            raise DinoregError(f"The setting '{s}' is not of the form KEY=VALUE.")
        k, v = s.split("=", 1)
        if not k.strip():
            raise DinoregError(f"The setting '{s}' has an empty key.")
        out.append((k.strip(), v.strip()))
    return out


def _finite(x: float, key: str, raw) -> float:
    if not math.isfinite(x):
        raise DinoregError(f"The setting {key}={raw!r} is not a finite number.")
    return x


def parse_literal(text, key: str = "value"):
    """Value of an untyped entry: non-strings as they are (non-finite floats refused), strings as JSON where they
    parse, ``none`` as None, otherwise the string."""
    if not isinstance(text, str):
        if isinstance(text, float):
            _finite(text, key, text)
        return text
    s = text.strip()
    if s.lower() in NONE_WORDS:
        return None
    if s.lower() in ("true", "false"):
        return s.lower() == "true"
    try:
        value = json.loads(s)
    except (json.JSONDecodeError, ValueError):
        if s.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
            raise DinoregError(f"The setting {key}={text!r} is not a finite number.") from None
        return text
    if isinstance(value, float):
        _finite(value, key, text)
    return value


def _bool(value, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise DinoregError(f"The setting {key}={value!r} must be true or false.")


def _int(value, key: str) -> int:
    if isinstance(value, bool):
        raise DinoregError(f"The setting {key}={value!r} must be an integer.")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
        try:
            value = float(value)
        except ValueError:
            raise DinoregError(f"The setting {key}={value!r} must be an integer.") from None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    raise DinoregError(f"The setting {key}={value!r} must be an integer.")


def _float(value, key: str) -> float:
    if isinstance(value, bool):
        raise DinoregError(f"The setting {key}={value!r} must be a number.")
    if isinstance(value, (int, float)):
        return _finite(float(value), key, value)
    if isinstance(value, str):
        try:
            return _finite(float(value.strip()), key, value)
        except ValueError:
            pass
    raise DinoregError(f"The setting {key}={value!r} must be a number.")


def _sequence(value, key: str) -> list:
    if isinstance(value, str):
        s = value.strip()
        if s.startswith("["):
            try:
                value = json.loads(s)
            except json.JSONDecodeError:
                raise DinoregError(f"The setting {key}={value!r} is not a JSON list.") from None
        else:
            value = [v.strip() for v in s.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise DinoregError(f"The setting {key}={value!r} must be a list.")
    return list(value)


def _split_optional(tp):
    """(inner type, True) for ``X | None`` / ``Optional[X]``, else (tp, False)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), True
    return tp, False


def convert(value, tp, key: str, default=dataclasses.MISSING):
    """``value`` (a string from the command line or a JSON value) as type ``tp`` (see the module rules)."""
    tp, optional = _split_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in NONE_WORDS)):
        return None
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return parse_literal(value, key)
    if origin in (typing.Union, types.UnionType):  # e.g. int | str: the first member that accepts the value
        for member in typing.get_args(tp):
            try:
                return convert(value, member, key)
            except DinoregError:
                continue
        raise DinoregError(f"The setting {key}={value!r} has the wrong type (expected {tp}).")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            value = parse_literal(value, key)
        if dataclasses.is_dataclass(value) and isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise DinoregError(f"The setting '{key}' must be an object with the fields of {tp.__name__}.")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        return _bool(value, key)
    if tp is int:
        return _int(value, key)
    if tp is float:
        return _float(value, key)
    if tp is str:
        if not isinstance(value, str):
            raise DinoregError(f"The setting {key}={value!r} must be a string.")
        return value
    if tp in (tuple, list) or origin in (tuple, list):
        items = _sequence(value, key)
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if args:
            items = [convert(v, args[0] if len(args) == 1 or Ellipsis in typing.get_args(tp) else args[i],
                             f"{key}[{i}]") for i, v in enumerate(items)]
        elif default is not dataclasses.MISSING and default:
            items = [convert(v, type(default[0]), f"{key}[{i}]") for i, v in enumerate(items)]
        return tuple(items) if (tp is tuple or origin is tuple) else items
    if tp is dict or origin is dict:
        if isinstance(value, str):
            value = parse_literal(value, key)
        if not isinstance(value, Mapping):
            raise DinoregError(f"The setting '{key}' must be an object.")
        return {str(k): parse_literal(v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise DinoregError(f"The setting {key}={value!r} has the wrong type (expected {getattr(tp, '__name__', tp)}).")


def field_types(cls) -> dict[str, Any]:
    """Field name -> declared type of a dataclass (annotations resolved; the default's type where they are not)."""
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: fall back to the defaults' types
        hints = {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in hints:
            out[f.name] = hints[f.name]
        elif f.default is not dataclasses.MISSING and f.default is not None:
            out[f.name] = type(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = type(f.default_factory())
        else:
            out[f.name] = Any
    return out


def _settable(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


def _unknown(key: str, cls, prefix: str) -> DinoregError:
    return DinoregError(f"Unknown setting '{prefix}{key}' of {cls.__name__}; known: {', '.join(sorted(_settable(cls)))}.")


def set_value(obj, key: str, value, *, prefix: str = "") -> None:
    """Set one dotted ``key`` on the dataclass instance ``obj`` (in place), converting ``value``."""
    head, _, rest = key.partition(".")
    cls = type(obj)
    if head not in _settable(cls):
        raise _unknown(head, cls, prefix)
    tp = field_types(cls)[head]
    current = getattr(obj, head)
    if rest:
        if dataclasses.is_dataclass(current):
            set_value(current, rest, value, prefix=f"{prefix}{head}.")
            return
        if isinstance(current, dict):
            current[rest] = parse_literal(value, f"{prefix}{key}")
            return
        raise DinoregError(f"The setting '{prefix}{key}' addresses a field inside '{prefix}{head}', which has none.")
    default = dataclasses.fields(cls)[[f.name for f in dataclasses.fields(cls)].index(head)].default
    setattr(obj, head, convert(value, tp, prefix + head, default))


def apply(obj, overrides: Mapping | Iterable[tuple[str, Any]] | None, *, prefix: str = ""):
    """Apply ``overrides`` (a mapping or (key, value) pairs; dotted keys allowed) to ``obj`` in place; returns it.

    A nested mapping value for a dataclass field is applied field by field (``{"convex": {"grid_sp": 4}}``).
    """
    items = overrides.items() if isinstance(overrides, Mapping) else (overrides or [])
    for key, value in items:
        key = str(key)
        head = key.partition(".")[0]
        if "." not in key and isinstance(value, Mapping) and head in _settable(type(obj)) \
                and dataclasses.is_dataclass(getattr(obj, head)):
            apply(getattr(obj, head), value, prefix=f"{prefix}{head}.")
        elif "." not in key and isinstance(value, Mapping) and head in _settable(type(obj)) \
                and isinstance(getattr(obj, head), dict):
            for k, v in value.items():
                getattr(obj, head)[str(k)] = parse_literal(v, f"{prefix}{head}.{k}")
        else:
            set_value(obj, key, value, prefix=prefix)
    return obj


def from_dict(cls, d: Mapping | None, *, prefix: str = ""):
    """A ``cls`` instance from a mapping of its fields (missing ones keep their defaults; unknown ones are errors)."""
    obj = cls()
    return apply(obj, dict(d or {}), prefix=prefix)


def to_dict(obj) -> dict:
    """A JSON-compatible dict of a dataclass instance (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj), default=str))


def load_file(path: str | os.PathLike, *, what: str = "settings file") -> dict:
    """The JSON (or YAML, with PyYAML) object in ``path``; one-sentence errors for a missing or bad file."""
    p = Path(path)
    if not p.is_file():
        raise DinoregError(f"The {what} {p} does not exist.")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise DinoregError(f"The {what} {p} is YAML but PyYAML is not installed; use JSON or "
                                   f"'pip install pyyaml'.") from None
            d = yaml.safe_load(text) or {}
        else:
            d = json.loads(text)
    except (json.JSONDecodeError, ValueError) as e:
        raise DinoregError(f"The {what} {p} could not be parsed ({e}).") from None
    if not isinstance(d, dict):
        raise DinoregError(f"The {what} {p} must hold one object of settings.")
    return d


def check_keys(options: Mapping | None, cls, *, what: str) -> None:
    """Raise unless every key of the free-form ``options`` is a field of the options dataclass ``cls``."""
    known = set(_settable(cls))
    bad = sorted(set(options or {}) - known)
    if bad:
        raise DinoregError(f"Unknown {what} option '{bad[0]}'; known: {', '.join(sorted(known)) or 'none'}.")
