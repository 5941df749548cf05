"""ANTs side of the ``ants`` peer: runs inside a Python that has ``antspyx`` (needs only numpy and ants).

antspyx pins numpy < 2.4 and scipy < 1.16, so it usually lives in its own virtual environment
(``.venv-peers``); :mod:`dinoreg_core.peers.ants` then runs this file as a script in that environment::

    python ants_worker.py IN.npz OUT.npz

``IN.npz`` holds ``fixed`` and ``moving`` ((D,H,W) float32, one grid), ``affine`` ((4,4) voxel -> world matrix
of that grid, mm, RAS) and ``spec`` (a JSON string: ``{"mode": "register", "settings": {...}}`` or
``{"mode": "field", "transforms": [paths]}``). ``OUT.npz`` receives ``disp`` ((3,D,H,W) float32), ``warped``
((D,H,W) float32, the moving image resampled by ANTs itself through the same transforms, for cross-checks) and
``info`` (a JSON string: settings used, seconds per stage, transform files).

Geometry. ANTs (ITK) works in LPS physical space: a voxel index ``i`` sits at ``p = origin + direction @ (spacing *
i)``. Our grid's RAS affine ``A`` becomes ``origin = F @ A[:3,3]`` and ``direction @ diag(spacing) = F @ A[:3,:3]``
with ``F = diag(-1,-1,1)``; ANTs' numpy arrays use the same (i,j,k) index order as ours. ANTs' forward transforms
(``fwdtransforms``: SyN warp, then affine) map a fixed physical point ``p`` to the moving physical point ``T(p)``
(that is how ``apply_transforms`` resamples the moving image onto the fixed grid). The composite of the list is
evaluated at every fixed voxel by ``antsApplyTransforms`` (``compose=``), giving ``v(p) = T(p) - p`` in LPS mm; our
displacement is the same vector in fixed voxel units, ``u = (F A[:3,:3])^-1 v``, which is backward
(``warped(x) = moving(x + u(x))``) with channel c = array axis c.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

import numpy as np

import worker_io  # beside this script (its folder comes first on sys.path when run as a script)

LPS = np.diag([-1.0, -1.0, 1.0])


def to_ants_image(array: np.ndarray, affine_ras: np.ndarray):
    """A (D,H,W) array on the grid with RAS voxel->world ``affine_ras`` as an ANTs image (LPS physical space)."""
    import ants

    m = LPS @ np.asarray(affine_ras, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing
    origin = LPS @ np.asarray(affine_ras, dtype=np.float64)[:3, 3]
    return ants.from_numpy(np.ascontiguousarray(array, dtype=np.float32), origin=tuple(float(x) for x in origin),
                           spacing=tuple(float(x) for x in spacing), direction=direction)


def lps_field_to_voxels(field_lps: np.ndarray, affine_ras: np.ndarray) -> np.ndarray:
    """(D,H,W,3) physical LPS displacement (mm) -> (3,D,H,W) float32 displacement in voxels of the grid."""
    m = LPS @ np.asarray(affine_ras, dtype=np.float64)[:3, :3]
    inv = np.linalg.inv(m)
    return np.einsum("ij,...j->i...", inv, field_lps.astype(np.float64)).astype(np.float32)


def displacement_from_transforms(fixed_img, transformlist: list[str], affine_ras: np.ndarray,
                                 workdir: str) -> np.ndarray:
    """Evaluate ANTs forward transforms on every fixed voxel: (3,D,H,W) float32, fixed voxels, backward."""
    import ants

    prefix = os.path.join(workdir, "composite_")
    path = ants.apply_transforms(fixed_img, fixed_img, transformlist=list(transformlist), compose=prefix)
    field = ants.image_read(path).numpy()  # (D,H,W,3), LPS mm
    return lps_field_to_voxels(field, affine_ras)


def _metric(settings: dict) -> tuple[str, int]:
    """ANTs metric name and its parameter (CC radius or MI bins)."""
    m = str(settings["metric"]).lower()
    if m == "cc":
        return "CC", int(settings["cc_radius"])
    if m in ("mi", "mattes"):
        return "mattes", int(settings["mi_bins"])
    if m in ("meansquares", "msq"):
        return "meansquares", 0
    raise ValueError(f"unknown ANTs metric {settings['metric']!r}")


def register(fixed: np.ndarray, moving: np.ndarray, affine_ras: np.ndarray, settings: dict, workdir: str) -> dict:
    """Run ``ants.registration`` with ``settings`` and return the displacement, ANTs' warped image and timings."""
    import ants

    if settings.get("seed") is not None:
        ants.config._random_seed = int(settings["seed"])  # passed on as antsRegistration --random-seed
    fi = to_ants_image(fixed, affine_ras)
    mi = to_ants_image(moving, affine_ras)
    metric, param = _metric(settings)
    t = time.perf_counter()
    reg = ants.registration(
        fi, mi, type_of_transform=settings["type_of_transform"], outprefix=os.path.join(workdir, "reg_"),
        syn_metric=metric, syn_sampling=param, reg_iterations=tuple(int(i) for i in settings["reg_iterations"]),
        grad_step=float(settings["grad_step"]), flow_sigma=float(settings["flow_sigma"]),
        total_sigma=float(settings["total_sigma"]), aff_metric=settings["aff_metric"],
        aff_sampling=int(settings["aff_sampling"]),
        aff_random_sampling_rate=float(settings["aff_random_sampling_rate"]), verbose=False)
    t_reg = time.perf_counter() - t
    t = time.perf_counter()
    disp = displacement_from_transforms(fi, reg["fwdtransforms"], affine_ras, workdir)
    t_conv = time.perf_counter() - t
    return {"disp": disp, "warped": reg["warpedmovout"].numpy().astype(np.float32),
            "info": {"ants_version": getattr(ants, "__version__", "?"), "registration_s": t_reg,
                     "conversion_s": t_conv, "fwdtransforms": [os.path.basename(p) for p in reg["fwdtransforms"]],
                     "antsRegistration_metric": f"{metric}[{param}]"}}


def field(fixed: np.ndarray, moving: np.ndarray, affine_ras: np.ndarray, transforms: list[str], workdir: str) -> dict:
    """Displacement of given ANTs/ITK transform files (fixed -> moving points) and ANTs' own resampling."""
    import ants

    fi = to_ants_image(fixed, affine_ras)
    mi = to_ants_image(moving, affine_ras)
    disp = displacement_from_transforms(fi, transforms, affine_ras, workdir)
    warped = ants.apply_transforms(fi, mi, transformlist=list(transforms)).numpy().astype(np.float32)
    return {"disp": disp, "warped": warped, "info": {"ants_version": getattr(ants, "__version__", "?")}}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: ants_worker.py IN.npz OUT.npz", file=sys.stderr)
        return 2
    src, dst = argv
    fixed, moving, affine, spec = worker_io.read_request(src)
    with tempfile.TemporaryDirectory(prefix="dinoreg_ants_") as work:
        if spec["mode"] == "register":
            out = register(fixed, moving, affine, spec["settings"], work)
        elif spec["mode"] == "field":
            out = field(fixed, moving, affine, spec["transforms"], work)
        else:
            print(f"unknown mode {spec['mode']!r}", file=sys.stderr)
            return 2
    worker_io.write_result(dst, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
