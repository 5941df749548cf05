"""Features of one scan as PCA-RGB volumes on the image grid (notebook 02's figure)."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..errors import DinoregError
from ..features.pca import pca_rgb, upsample


def features_to_rgb(features, shape, *, seed: int = 0) -> np.ndarray:
    """A feature volume -> (D,H,W,3) PCA-RGB in [0,1] on the image grid ``shape``.

    Accepts an RGB volume (D,H,W,3) already on the grid (returned as float32), or features (C,d,h,w) /
    (1,C,d,h,w) (numpy or torch), which go through :func:`dinoreg_core.features.pca.pca_rgb` and trilinear
    resizing to ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if isinstance(features, np.ndarray) and features.shape == shape + (3,):
        return features.astype(np.float32, copy=False)
    f = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features).float()
    if f.ndim == 4:
        f = f[None]
    if f.ndim != 5:
        raise DinoregError(f"Features must be (D,H,W,3) RGB or (1,C,d,h,w)/(C,d,h,w), got shape {tuple(f.shape)}.")
    rgb = upsample(torch.from_numpy(pca_rgb(f, seed=seed)).permute(3, 0, 1, 2)[None].float(), shape)  # (1,3,D,H,W)
    return rgb[0].permute(1, 2, 3, 0).clamp(0, 1).numpy().astype(np.float32)


def feature_rgb(image, methods, *, modality: str | None = None, options: dict | None = None, device: str = "cpu",
                seed: int = 0, progress: bool = True) -> tuple[np.ndarray, dict, dict]:
    """Features of one scan per method as PCA-RGB volumes on the image grid.

    ``image``: a NIfTI path or :class:`dinoreg_core.io.Volume`. Returns (normalised image (D,H,W) in [0,1],
    {method: (D,H,W,3) float32 in [0,1]}, {method: seconds}). The first three principal components of each
    method's features are fitted on this scan alone (:func:`dinoreg_core.features.pca.pca_rgb`), then resized
    trilinearly to the image grid.
    """
    from tqdm.auto import tqdm

    from .. import io
    from ..features.registry import checked_options, get_feature_method
    from ..preprocess import guess_modality, normalize_intensity

    vol = image if isinstance(image, io.Volume) else io.load_volume(image, what="image")
    mod = modality or guess_modality(vol.array)
    img = normalize_intensity(vol.array, mod)
    dev = torch.device(device)
    t = torch.from_numpy(np.ascontiguousarray(img))[None, None].to(dev)
    rgb, secs = {}, {}
    for m in tqdm(list(methods), desc="features", disable=not progress):
        t0 = time.perf_counter()
        with torch.no_grad():
            opts = checked_options(m, (options or {}).get(m))
            f = get_feature_method(m).extract(t, modality=mod, device=dev, options=opts)
            rgb[m] = features_to_rgb(f.float().cpu(), img.shape, seed=seed)
        secs[m] = round(time.perf_counter() - t0, 2)
    return img, rgb, secs
