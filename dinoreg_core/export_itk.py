"""Transforms that ITK, ANTs and 3D Slicer apply as they are.

ITK works in LPS physical space (x to the patient's Left, y Posterior, z Superior, mm) and describes a transform
by the point map from the *fixed* (output) space to the *moving* (input) space, which is what a resampler needs.
Our registration's point map (see :func:`dinoreg_core.io.whole_transform_coords`) is: the deformable part
``x -> x + d(x)`` on the fixed grid (world mm), then the initial world transform ``T`` (fixed world -> moving world).

Files written by :func:`export_itk` into an output folder:

* ``itk_deformable.nii.gz``: the deformable part as an ITK displacement field: a vector NIfTI (X,Y,Z,1,3),
  intent ``NIFTI_INTENT_DISPVECT`` (1006), on the fixed file's grid, vectors in world mm. On disk the vectors
  follow the NIfTI standard (RAS axes); ITK's NIfTI reader (ITK 5.4: SimpleITK, antspyx/ANTs, Slicer) turns a
  DISPVECT file into its LPS field on reading (measured: a stored (1,2,3) reads as (-1,-2,3)), so the tools
  see the field in LPS mm.
* ``itk_initial_affine.tfm`` (ITK text) and ``itk_initial_affine.mat`` (the ITK/ANTs binary MATLAB form): the
  initial alignment ``T`` as an ``AffineTransform_double_3_3`` in LPS.
* ``itk_composite.nii.gz``: the whole transform (initial alignment composed with the deformable part) as one
  displacement field on the fixed grid, so every tool applies it in one call.

Usage (the moving image resampled onto the fixed grid, as ``warped.nii.gz``)::

    antsApplyTransforms -d 3 -i moving.nii.gz -r fixed.nii.gz -o warped_ants.nii.gz -t itk_composite.nii.gz
    antsApplyTransforms -d 3 -i moving.nii.gz -r fixed.nii.gz -o warped_ants.nii.gz \
        -t itk_initial_affine.mat -t itk_deformable.nii.gz          # the same, in two parts
    # SimpleITK
    tx = sitk.DisplacementFieldTransform(sitk.ReadImage("itk_composite.nii.gz", sitk.sitkVectorFloat64))
    warped = sitk.Resample(moving, fixed, tx, sitk.sitkLinear)
    # 3D Slicer: load itk_composite.nii.gz as a transform (Add data > "Transform"), set it as the moving
    # volume's parent transform, then harden it.
"""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import scipy.io

from . import io
from .atomic import atomic_path, write_text_atomic
from .errors import DinoregError

NIFTI_INTENT_DISPVECT = 1006
RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])  # its own inverse
ITK_AFFINE_TYPE = "AffineTransform_double_3_3"
DEFORMABLE_NAME = "itk_deformable.nii.gz"
COMPOSITE_NAME = "itk_composite.nii.gz"
AFFINE_TFM_NAME = "itk_initial_affine.tfm"
AFFINE_MAT_NAME = "itk_initial_affine.mat"


def world_displacement(disp: np.ndarray, fixed: io.Volume) -> np.ndarray:
    """A canonical (3,D,H,W) fixed-voxel displacement as (3,D',H',W') mm along RAS, in the fixed file's voxel order."""
    ras = io.displacement_to_world(np.asarray(disp, np.float32), fixed.affine)  # canonical grid, mm along RAS
    return io.to_original_orientation(ras.astype(np.float32), fixed)


def affine_to_lps(world_transform: np.ndarray) -> np.ndarray:
    """A (4,4) RAS world transform (fixed -> moving points) expressed in LPS: ``F @ T @ F``, F = diag(-1,-1,1,1)."""
    return RAS_TO_LPS @ np.asarray(world_transform, dtype=np.float64) @ RAS_TO_LPS


def composite_displacement(disp: np.ndarray, fixed: io.Volume, world_transform: np.ndarray | None) -> np.ndarray:
    """The whole transform as one (3,D',H',W') RAS mm displacement on the fixed file grid: ``T(x + d(x)) - x``."""
    t = np.eye(4) if world_transform is None else np.asarray(world_transform, dtype=np.float64)
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in fixed.shape], indexing="ij"))
    a = fixed.affine
    x = np.einsum("ij,j...->i...", a[:3, :3], grid) + a[:3, 3].reshape(3, 1, 1, 1)  # fixed world (RAS)
    y = x + np.einsum("ij,j...->i...", a[:3, :3], np.asarray(disp, np.float64))  # after the deformable part
    z = np.einsum("ij,j...->i...", t[:3, :3], y) + t[:3, 3].reshape(3, 1, 1, 1)  # moving world (RAS)
    return io.to_original_orientation((z - x).astype(np.float32), fixed)


def save_itk_displacement(field_ras: np.ndarray, fixed: io.Volume, path: str | os.PathLike) -> Path:
    """Write a (3,D',H',W') RAS mm field (fixed file voxel order) as a vector NIfTI with the displacement intent,
    which ITK reads as the same field in LPS (see the module docstring)."""
    path = Path(path)
    data = np.moveaxis(np.asarray(field_ras, np.float32), 0, -1)[:, :, :, None, :]  # (X,Y,Z,1,3)
    img = nib.Nifti1Image(data, fixed.original_affine)
    img.set_qform(fixed.original_affine, code=1)
    img.set_sform(fixed.original_affine, code=1)
    img.header.set_intent(NIFTI_INTENT_DISPVECT, name="DISPVECT")
    img.header.set_xyzt_units("mm")
    try:
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
    except OSError as e:
        raise DinoregError(f"The output file {path} cannot be written ({e.strerror or e}).") from None
    return path


def _affine_parameters(world_transform: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = affine_to_lps(world_transform)
    return np.concatenate([m[:3, :3].ravel(), m[:3, 3]]), np.zeros(3)  # ITK: 9 matrix + 3 translation; centre 0


def save_itk_affine_tfm(world_transform: np.ndarray, path: str | os.PathLike) -> Path:
    """Write the initial alignment (4,4 RAS, fixed -> moving points) as an ITK text transform (.tfm, LPS)."""
    params, fixed = _affine_parameters(world_transform)
    text = ("#Insight Transform File V1.0\n#Transform 0\n"
            f"Transform: {ITK_AFFINE_TYPE}\n"
            f"Parameters: {' '.join(repr(float(v)) for v in params)}\n"
            f"FixedParameters: {' '.join(repr(float(v)) for v in fixed)}\n")
    write_text_atomic(path, text)
    return Path(path)


def save_itk_affine_mat(world_transform: np.ndarray, path: str | os.PathLike) -> Path:
    """Write the initial alignment as the binary MATLAB (v4) transform ITK and ANTs read (``.mat``, LPS)."""
    params, fixed = _affine_parameters(world_transform)
    path = Path(path)
    with atomic_path(path) as tmp:
        scipy.io.savemat(str(tmp), {ITK_AFFINE_TYPE: params.reshape(12, 1), "fixed": fixed.reshape(3, 1)},
                         format="4")
    return path


def export_itk(disp: np.ndarray, fixed: io.Volume, world_transform: np.ndarray | None, out_dir: str | os.PathLike
               ) -> dict[str, Path]:
    """Write the ITK/ANTs/Slicer transform files (see the module docstring) into ``out_dir``.

    Args:
        disp: (3,D,H,W) canonical fixed-voxel displacement (the registration's deformable part).
        fixed: the fixed volume (its file grid is the grid of the fields).
        world_transform: (4,4) initial alignment, fixed world -> moving world (RAS); identity when None.

    Returns:
        name -> written path (``itk_deformable``, ``itk_affine_tfm``, ``itk_affine_mat``, ``itk_composite``).
    """
    out = Path(out_dir)
    t = np.eye(4) if world_transform is None else np.asarray(world_transform, dtype=np.float64)
    return {
        "itk_deformable": save_itk_displacement(world_displacement(disp, fixed), fixed, out / DEFORMABLE_NAME),
        "itk_affine_tfm": save_itk_affine_tfm(t, out / AFFINE_TFM_NAME),
        "itk_affine_mat": save_itk_affine_mat(t, out / AFFINE_MAT_NAME),
        "itk_composite": save_itk_displacement(composite_displacement(disp, fixed, t), fixed, out / COMPOSITE_NAME),
    }


def inside_moving_grid(sitk, fixed, composite_path, moving_path, tol: float = 1e-6) -> np.ndarray:
    """(z,y,x) bool mask of the SimpleITK image ``fixed``'s voxels whose point, moved by the composite field as ITK
    reads it, lies between the moving grid's first and last voxel centres (ITK extrapolates the border half-voxel;
    we do not). ``sitk``: the SimpleITK module (an optional dependency, so the caller passes it in)."""
    moving = sitk.ReadImage(str(moving_path))
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(composite_path), sitk.sitkVectorFloat64))  # (z,y,x,3) LPS
    size = fixed.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in size[::-1]], indexing="ij")[::-1], -1)  # (z,y,x,3)
    d_f = np.array(fixed.GetDirection()).reshape(3, 3) * np.array(fixed.GetSpacing())
    pts = idx @ d_f.T + np.array(fixed.GetOrigin()) + field
    d_m = np.array(moving.GetDirection()).reshape(3, 3) * np.array(moving.GetSpacing())
    cidx = (pts - np.array(moving.GetOrigin())) @ np.linalg.inv(d_m).T
    return np.all((cidx >= -tol) & (cidx <= np.array(moving.GetSize()) - 1 + tol), axis=-1)
