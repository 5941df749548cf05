"""On-disk cache of backbone features, so tuning and every preset reuse one extraction per volume.

An entry is keyed by the SHA-256 of:

* the image: its shape and float32 bytes (the normalised (1,1,D,H,W) tensor the extractor sees);
* the method name and the modality;
* the weights: resolved path, size in bytes and modification time (ns) — a retrained or replaced file misses;
* the extraction options: every option except those in :data:`NEUTRAL_OPTIONS` (which cannot change the
  result), as canonical JSON (sorted keys); any change misses;
* the device type (CUDA runs in bf16 autocast, so its features differ from CPU float32 ones) and
  :data:`FORMAT` (bumped when the extraction code changes what it returns).

Entries are ``ROOT/<method>/<key[:2]>/<key>.safetensors`` (one tensor ``features``, plus the key's parts as
metadata for inspection), written atomically (temporary file in the same folder, then rename), so a crash
never leaves a truncated entry and concurrent writers of one key just replace each other's identical file.
Nothing is ever deleted by the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..atomic import atomic_path
from ..errors import DinoregError

FORMAT = "dinoreg-feature-cache/1"
NEUTRAL_OPTIONS = frozenset({"progress", "cache_dir"})   # options that never change the features


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def image_digest(image: torch.Tensor) -> str:
    """SHA-256 (hex) of an image tensor's shape and float32 contents."""
    x = image.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(repr(tuple(x.shape)).encode())
    h.update(x.numpy().tobytes())
    return h.hexdigest()


def weights_identity(weights: str | os.PathLike | None) -> dict | None:
    """{"path", "size", "mtime_ns"} of a weights file (None when the method has no weights)."""
    if weights is None:
        return None
    p = Path(weights).expanduser().resolve()
    try:
        st = p.stat()
    except OSError:
        raise DinoregError(f"The weights file {p} cannot be read for the feature cache key.") from None
    return {"path": str(p), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def _canonical(value):
    """JSON-stable form of an option value (tuples -> lists, paths -> strings)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


@dataclass
class FeatureCache:
    """Feature cache under ``root`` (created on first write). ``hits``/``misses`` count lookups."""

    root: Path
    hits: int = 0
    misses: int = 0

    def __post_init__(self):
        self.root = Path(self.root).expanduser()

    def key_parts(self, image: torch.Tensor, *, method: str, modality: str, weights=None, options=None,
                  device="cpu") -> dict:
        """The parts hashed into an entry's key (see the module docstring)."""
        opts = {k: v for k, v in (options or {}).items() if k not in NEUTRAL_OPTIONS}
        return {"format": FORMAT, "image": image_digest(image), "method": method, "modality": modality,
                "weights": weights_identity(weights), "options": _canonical(opts),
                "device": torch.device(device).type}

    def path_for(self, parts: dict) -> Path:
        key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
        return self.root / parts["method"].replace("/", "_") / key[:2] / f"{key}.safetensors"

    def get_or_compute(self, image: torch.Tensor, compute: Callable[[], torch.Tensor], *, method: str,
                       modality: str, weights=None, options=None, device="cpu") -> torch.Tensor:
        """The cached features of ``image`` if present, else ``compute()`` (stored before returning).

        Returns float32 features on ``device``; ``compute`` must return a tensor.
        """
        from safetensors.torch import load_file, save_file

        parts = self.key_parts(image, method=method, modality=modality, weights=weights, options=options,
                               device=device)
        path = self.path_for(parts)
        if path.is_file():
            try:
                feats = load_file(str(path))["features"]
                self.hits += 1
                return feats.to(device)
            except Exception:  # an unreadable entry (e.g. a foreign file) is recomputed and replaced
                pass
        self.misses += 1
        feats = compute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"features": feats.detach().to("cpu", torch.float32).contiguous()}, str(tmp),
                          metadata={"key": json.dumps(parts, sort_keys=True)})
                os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600 files; entries are as shareable as others
        except OSError as e:
            raise DinoregError(f"The feature cache folder {self.root} is not writable ({e.strerror or e}).") from None
        return feats
