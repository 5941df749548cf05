"""Features of one scan as PCA-RGB volumes on the image grid (notebook 02's figure)."""

from __future__ import annotations

import time

import numpy as np


def feature_rgb(image, methods, *, modality: str | None = None, options: dict | None = None, device: str = "cpu",
                seed: int = 0, progress: bool = True) -> tuple[np.ndarray, dict, dict]:
    """Features of one scan per method as PCA-RGB volumes on the image grid.

    ``image``: a NIfTI path or :class:`dinoreg_core.io.Volume`. Returns (normalised image (D,H,W) in [0,1],
    {method: (D,H,W,3) float32 in [0,1]}, {method: seconds}). The first three principal components of each
    method's features are fitted on this scan alone (:func:`dinoreg_core.features.pca.pca_rgb`), then resized
    trilinearly to the image grid.
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    from .. import io
    from ..features.pca import pca_rgb
    from ..features.registry import get_feature_method
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
            f = get_feature_method(m).extract(t, modality=mod, device=dev, options=dict((options or {}).get(m, {})))
            c = pca_rgb(f.float().cpu(), seed=seed)                             # (d,h,w,3)
            c = torch.from_numpy(np.ascontiguousarray(c)).permute(3, 0, 1, 2)[None].float()
            if tuple(c.shape[2:]) != tuple(img.shape):
                c = F.interpolate(c, size=img.shape, mode="trilinear", align_corners=False)
        rgb[m] = c[0].permute(1, 2, 3, 0).clamp(0, 1).numpy().astype(np.float32)
        secs[m] = round(time.perf_counter() - t0, 2)
    return img, rgb, secs
