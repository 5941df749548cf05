"""uniGradICON side of the ``unigradicon`` peer: runs inside a Python that has ``unigradicon`` (and itk).

Run as a script by :mod:`dinoreg_core.peers.unigradicon`::

    python unigradicon_worker.py IN.npz OUT.npz     # register (see below)
    python unigradicon_worker.py --probe            # exit 0 when the packages import

``IN.npz``: ``fixed``, ``moving`` ((D,H,W) float32 raw intensities on one grid: CT in HU, MR in scanner units),
``affine`` ((4,4) RAS voxel -> world of that grid) and ``spec`` (JSON: ``{"settings": {...}}`` with ``weights``,
``fixed_modality``/``moving_modality`` ("ct"|"mri"), ``io_iterations`` (None = no instance optimisation),
``io_lr``, ``io_sim``, ``model``, ``device``). ``OUT.npz``: ``disp`` ((3,D,H,W) float32 fixed voxels, backward),
``warped`` (the moving image resampled by ITK through the same transform) and ``info`` (JSON).

The documented uniGradICON path, step by step (as its ``unigradicon-register`` command):
``get_model_from_model_zoo(model, make_sim(io_sim), weights_location=...)`` -> ``preprocess(image, modality)``
(CT clipped to [-1000, 1000] HU, MR min..99th percentile, scaled to [0, 1]) ->
``icon_registration.itk_wrapper.register_pair(net, moving, fixed, finetune_steps=...)``, whose ``phi_AB`` maps
fixed physical points to moving physical points (``warp(moving, phi_AB)`` lies on the fixed image). It is
evaluated at every fixed voxel with ``itk.transform_to_displacement_field_filter`` (LPS mm) and converted to fixed
voxel units exactly as for ANTs.

torchvision: icon_registration imports it at package import (for its MNIST data helpers only). A torchvision
wheel from PyPI does not load beside a CPU build of torch; when the import fails, an empty stand-in module takes
its place (``info["torchvision_stub"]``), since the registration path never calls it.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import worker_io  # beside this script (its folder comes first on sys.path when run as a script)

LPS = np.diag([-1.0, -1.0, 1.0])


def import_packages() -> dict:
    """Import itk, unigradicon and icon_registration (with the torchvision stand-in when needed)."""
    import types

    stub = False
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - any failure to load the CUDA-built extension
        for k in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[k]
        tv = types.ModuleType("torchvision")
        for sub in ("datasets", "transforms", "utils"):
            m = types.ModuleType(f"torchvision.{sub}")
            setattr(tv, sub, m)
            sys.modules[f"torchvision.{sub}"] = m
        sys.modules["torchvision"] = tv
        stub = True
    import icon_registration  # noqa: F401
    import icon_registration.itk_wrapper  # noqa: F401
    import itk  # noqa: F401
    import unigradicon  # noqa: F401

    return {"torchvision_stub": stub}


def to_itk_image(array: np.ndarray, affine_ras: np.ndarray):
    """A (D,H,W) array on a RAS grid as an ITK float image (LPS physical space; ITK arrays are (k,j,i))."""
    import itk

    m = LPS @ np.asarray(affine_ras, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    img = itk.image_from_array(np.ascontiguousarray(np.asarray(array, np.float32).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(x) for x in LPS @ np.asarray(affine_ras, dtype=np.float64)[:3, 3]])
    img.SetDirection(itk.matrix_from_array(np.ascontiguousarray(m / spacing)))
    return img


def transform_to_voxel_displacement(transform, fixed_img, affine_ras: np.ndarray) -> np.ndarray:
    """Evaluate an ITK transform (fixed -> moving points) on the fixed grid: (3,D,H,W) float32 fixed voxels."""
    import itk

    field = itk.transform_to_displacement_field_filter(transform, reference_image=fixed_img,
                                                       use_reference_image=True)
    v = np.asarray(itk.array_from_image(field), dtype=np.float64).transpose(2, 1, 0, 3)  # (i,j,k,3) LPS mm
    inv = np.linalg.inv(LPS @ np.asarray(affine_ras, dtype=np.float64)[:3, :3])
    return np.einsum("ij,...j->i...", inv, v).astype(np.float32)


def register(fixed: np.ndarray, moving: np.ndarray, affine_ras: np.ndarray, s: dict) -> dict:
    info = import_packages()
    import icon_registration.config
    import icon_registration.itk_wrapper
    import itk
    import torch
    import unigradicon

    torch.manual_seed(int(s.get("seed", 0)))
    icon_registration.config.device = torch.device(s.get("device", "cpu"))
    t = time.perf_counter()
    net = unigradicon.get_model_from_model_zoo(s["model"], unigradicon.make_sim(s["io_sim"]),
                                               weights_location=s["weights"])
    info["load_s"] = time.perf_counter() - t
    fi, mi = to_itk_image(fixed, affine_ras), to_itk_image(moving, affine_ras)
    fp = unigradicon.preprocess(fi, s["fixed_modality"])
    mp = unigradicon.preprocess(mi, s["moving_modality"])
    t = time.perf_counter()
    io_steps = s.get("io_iterations")
    kw = {"learning_rate": float(s["io_lr"])} if io_steps else {}
    phi_ab, _ = icon_registration.itk_wrapper.register_pair(net, mp, fp, finetune_steps=io_steps or None, **kw)
    info["registration_s"] = time.perf_counter() - t
    disp = transform_to_voxel_displacement(phi_ab, fi, affine_ras)
    warped = itk.resample_image_filter(mi, transform=phi_ab, use_reference_image=True, reference_image=fi)
    info["unigradicon_input_shape"] = list(unigradicon.input_shape)
    return {"disp": disp, "warped": np.asarray(itk.array_from_image(warped), np.float32).transpose(2, 1, 0),
            "info": info}


def main(argv: list[str]) -> int:
    if argv == ["--probe"]:
        import_packages()
        return 0
    if len(argv) != 2:
        print("usage: unigradicon_worker.py IN.npz OUT.npz | --probe", file=sys.stderr)
        return 2
    src, dst = argv
    fixed, moving, affine, spec = worker_io.read_request(src)
    out = register(fixed, moving, affine, spec["settings"])
    worker_io.write_result(dst, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
