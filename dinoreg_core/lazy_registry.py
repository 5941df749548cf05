"""The one lookup-table mechanism behind the registries: name -> entry, with built-in entries imported on first use.

Used by the extractor table (:mod:`dinoreg_core.features.registry`) and the registry of registration methods
(:mod:`dinoreg_core.pipeline.methods`). A built-in name maps to the module that registers it at import, so looking a
name up never imports more than that module.
"""

from __future__ import annotations

import importlib
from typing import Callable

from .errors import DinoregError


class LazyRegistry:
    """Entries (objects with a ``name``) by name; ``builtin``: name -> module that adds the entry when imported."""

    def __init__(self, kind: str, builtin: dict[str, str] | None = None, *,
                 extra_names: Callable[[], list[str]] | None = None, make: Callable | None = None):
        """``extra_names`` / ``make``: names known elsewhere and how to build their entry on first lookup."""
        self.kind = kind
        self.builtin = dict(builtin or {})
        self.extra_names = extra_names
        self.make = make
        self.entries: dict = {}

    def add(self, entry):
        """Add ``entry`` (replacing one of the same name); returns it."""
        self.entries[entry.name] = entry
        return entry

    def names(self) -> list[str]:
        """Every name that can be looked up (whether or not its packages or weights are present)."""
        extra = set(self.extra_names()) if self.extra_names else set()
        return sorted(set(self.builtin) | set(self.entries) | extra)

    def get(self, name: str):
        """The entry called ``name``; one sentence naming the known ones when there is none."""
        if name not in self.entries and name in self.builtin:
            importlib.import_module(self.builtin[name])
        if name not in self.entries and self.make is not None and self.extra_names and name in self.extra_names():
            self.add(self.make(name))
        if name not in self.entries:
            raise DinoregError(f"Unknown {self.kind} '{name}'; known: {', '.join(self.names())}.")
        return self.entries[name]
