"""One backbone extraction per volume within an evaluation: :func:`memoized_extraction`.

Tuning and the evaluation protocol register the same volumes many times (every preset, every search candidate,
a CT of case c as the fixed scan of one pair and the moving scan of the next). Inside ``with
memoized_extraction(("dino3d",), cache_dir=...)``, the registry's extractor of each named method is wrapped: a call
with an image it has seen (same bytes, shape, modality, options and, for ``dino3d``, the same weights file) returns
the stored features instead of running the backbone again. The stored features are the extractor's own output
(before joint PCA and upsampling), so PCA dimension, ``feature_scale`` and every ConvexAdam setting reuse them.

With ``cache_dir`` the features are also written there (``<method>-<key>.pt``, atomically), so a resumed or later
run in the same folder does not extract again. Nothing outside the block changes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..features import registry

DEFAULT_METHODS = ("dino3d", "dinov2")  # backbones worth storing (MIND and intensities are cheap to recompute)


def weights_identity(method: str, options: dict) -> str:
    """A string that changes when the weights file ``method`` would load changes (path, size, mtime)."""
    if method != "dino3d":
        return str(options.get("weights", ""))
    from ..features.dino3d import resolve_weights

    p = resolve_weights(options)
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def feature_key(method: str, image: torch.Tensor, modality: str, options: dict) -> str:
    """Hex digest of (method, image bytes and shape, modality, options, weights identity)."""
    h = hashlib.blake2b(digest_size=16)
    arr = image.detach().to("cpu", torch.float32).contiguous().numpy()
    h.update(arr.tobytes())
    meta = {"method": method, "shape": list(arr.shape), "modality": modality,
            "options": {k: v for k, v in sorted(options.items()) if k != "progress"},
            "weights": weights_identity(method, options)}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()


class FeatureMemo:
    """The store behind :func:`memoized_extraction`: in memory, and in ``cache_dir`` when given."""

    def __init__(self, cache_dir=None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.store: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def wrap(self, method: str, extract):
        def memo_extract(image, *, modality, device, options):
            opts = dict(options or {})
            key = feature_key(method, image, modality, opts)
            path = self.cache_dir / f"{method}-{key}.pt" if self.cache_dir is not None else None
            if key not in self.store and path is not None and path.is_file():
                self.store[key] = torch.load(path, map_location="cpu", weights_only=True)
            if key in self.store:
                self.hits += 1
                return self.store[key].to(device).clone()
            self.misses += 1
            feats = extract(image, modality=modality, device=device, options=options)
            self.store[key] = feats.detach().to("cpu").clone()
            if path is not None:
                with atomic_path(path) as tmp:
                    torch.save(self.store[key], tmp)
            return feats

        return memo_extract


@contextlib.contextmanager
def memoized_extraction(methods=DEFAULT_METHODS, cache_dir=None):
    """Within the block the extractors of ``methods`` remember their features per image (module docstring);
    yields the :class:`FeatureMemo` (``hits`` / ``misses`` count the calls)."""
    memo = FeatureMemo(cache_dir)
    saved = {}
    for name in methods:
        try:
            fm = registry.get_feature_method(name)
        except Exception:  # noqa: BLE001 - a method that is not available here is simply not wrapped
            continue
        saved[name] = fm
        registry.register_feature_method(replace(fm, extract=memo.wrap(name, fm.extract)))
    try:
        yield memo
    finally:
        for name, fm in saved.items():
            registry.register_feature_method(fm)
