"""The ``--set`` key forms and the one value check shared by :mod:`.config` and :mod:`.feature_path` (kept apart so
neither imports the other)."""

from __future__ import annotations

from dataclasses import fields

from ..registration.convex_adam import ConvexAdamConfig

FEATURE_PREFIX = "feat."  # short form of "feature_options." on the command line


def canonical_key(key: str, top_fields) -> str:
    """``feat.X`` -> ``feature_options.X``; a bare ConvexAdam field name -> ``convex.NAME``; others unchanged."""
    key = key.strip()
    if key.startswith(FEATURE_PREFIX):
        return "feature_options." + key[len(FEATURE_PREFIX):]
    head = key.partition(".")[0]
    if head not in top_fields and head in {f.name for f in fields(ConvexAdamConfig)}:
        return "convex." + key
    return key


def check_feature_scale(value: float) -> None:
    """One sentence unless ``feature_scale`` is a positive number."""
    from ..errors import DinoregError

    if not float(value) > 0:
        raise DinoregError(f"The setting feature_scale={value} must be a positive number (it multiplies the "
                           f"features handed to ConvexAdam).")
