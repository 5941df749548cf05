"""NIfTI input/output in the project's conventions, and Learn2Reg dataset files.

Conventions (DESIGN.md section 2):

* On load, a volume is reoriented to the closest canonical orientation (RAS+): array axes (D,H,W) are the
  NIfTI voxel axes (i,j,k) after reorientation, pointing to the patient's Right, Anterior, Superior.
  The file's own affine and shape are kept so results can be written back in the input's space.
* Images are float32, labels int32 (0 = background).
* A displacement field is (3,D,H,W) in voxel units of the (canonical) fixed grid, channel c = array axis c,
  backward: ``warped(x) = moving(x + u(x))``. :func:`save_displacement` writes it back in the file's own
  voxel axes (permuting and negating components as the reorientation requires); :func:`save_l2r_displacement`
  writes the Learn2Reg submission layout (D,H,W,3).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .atomic import atomic_path
from .errors import DinoregError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class Volume:
    """A 3D scan (or label map) in canonical RAS orientation.

    Attributes:
        array: (D,H,W) float32 image or int32 label map, canonical RAS voxel order.
        affine: (4,4) voxel -> world (mm, RAS) matrix of ``array``.
        original_affine: (4,4) affine of the file as stored.
        original_shape: shape of the file's voxel array as stored.
        path: the file it came from (None for volumes made in memory).
    """

    array: np.ndarray
    affine: np.ndarray
    original_affine: np.ndarray = None  # type: ignore[assignment]
    original_shape: tuple = None  # type: ignore[assignment]
    path: str | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.original_affine is None:
            self.original_affine = self.affine.copy()
        if self.original_shape is None:
            self.original_shape = tuple(self.array.shape)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along (D,H,W)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)

    def like(self, array: np.ndarray) -> "Volume":
        """A volume with a new array on the same grid (same affines and provenance)."""
        if tuple(array.shape[-3:]) != self.shape:
            raise ValueError(f"array shape {array.shape} does not match the grid {self.shape}")
        return Volume(array, self.affine.copy(), self.original_affine.copy(), self.original_shape, self.path)


def _check_path(path: str | os.PathLike, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise DinoregError(f"The {what} file {p} does not exist.")
    if p.is_dir():
        raise DinoregError(f"The {what} path {p} is a folder, not a NIfTI file.")
    if not str(p).endswith(NIFTI_SUFFIXES):
        raise DinoregError(f"The {what} file {p} is not a NIfTI file (expected .nii or .nii.gz).")
    return p


def _read_nifti(p: Path, what: str) -> nib.Nifti1Image:
    try:
        img = nib.load(str(p))
        if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
            raise DinoregError(f"The {what} file {p} is not a NIfTI image.")
        from .validate import check_nifti_size

        check_nifti_size(img, p, what)  # before the voxels are allocated
        img = nib.Nifti1Image(np.asanyarray(img.dataobj), img.affine, img.header) if isinstance(
            img, nib.Nifti2Image) else img
        # Force the data read now so truncation or corruption is reported here, not later.
        data = np.asanyarray(img.dataobj)
    except DinoregError:
        raise
    except (OSError, EOFError, ValueError, zlib.error, nib.filebasedimages.ImageFileError) as e:
        detail = " ".join(str(e).split())
        raise DinoregError(f"The {what} file {p} is damaged or truncated (could not be read as NIfTI: "
                           f"{type(e).__name__}: {detail}).") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
        img = nib.Nifti1Image(data, img.affine, img.header)
    if data.ndim != 3:
        raise DinoregError(f"The {what} file {p} has shape {tuple(data.shape)}; a 3D volume is required.")
    if min(data.shape) < 2:
        raise DinoregError(f"The {what} file {p} has shape {tuple(data.shape)}; every axis needs at least 2 voxels.")
    if not np.all(np.isfinite(img.affine)) or abs(np.linalg.det(img.affine[:3, :3])) < 1e-12:
        raise DinoregError(f"The {what} file {p} has an invalid (singular or non-finite) affine.")
    return img


def canonical_transform(original_affine: np.ndarray) -> np.ndarray:
    """The nibabel orientation array that reorients a file's voxel axes to closest RAS+ (shape (3,2))."""
    return nib.orientations.io_orientation(original_affine)


def _to_canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ornt = canonical_transform(affine)
    arr = nib.orientations.apply_orientation(data, ornt)
    new_aff = affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)
    return np.ascontiguousarray(arr), new_aff


def load_volume(path: str | os.PathLike, *, what: str = "image") -> Volume:
    """Load a NIfTI image as a canonical RAS float32 :class:`Volume`.

    Raises :class:`DinoregError` (one sentence naming the file) for a missing, corrupt or non-3D file and for
    NaN/inf voxels.
    """
    p = _check_path(path, what)
    img = _read_nifti(p, what)
    data = np.asanyarray(img.dataobj).astype(np.float32)
    bad = ~np.isfinite(data)
    if bad.any():
        raise DinoregError(f"The {what} file {p} contains {int(bad.sum())} NaN or infinite voxels.")
    arr, aff = _to_canonical(data, img.affine)
    return Volume(arr, aff, img.affine.copy(), tuple(data.shape), str(p))


def load_labels(path: str | os.PathLike, *, what: str = "label") -> Volume:
    """Load a NIfTI label map as a canonical RAS int32 :class:`Volume` (0 = background).

    Raises :class:`DinoregError` for non-integer or negative values and for a map with no foreground label.
    """
    p = _check_path(path, what)
    img = _read_nifti(p, what)
    data = np.asanyarray(img.dataobj)
    if not np.issubdtype(data.dtype, np.integer):
        data = np.asarray(data, dtype=np.float64)
        if not np.all(np.isfinite(data)) or np.any(np.abs(data - np.round(data)) > 1e-3):
            raise DinoregError(f"The {what} file {p} holds non-integer values; a label map must hold integer ids.")
        data = np.round(data)
    data = data.astype(np.int64)
    if data.min() < 0:
        raise DinoregError(f"The {what} file {p} holds negative label ids.")
    if data.max() == 0:
        raise DinoregError(f"The {what} file {p} is empty (no voxel has a non-zero label).")
    arr, aff = _to_canonical(data.astype(np.int32), img.affine)
    return Volume(arr, aff, img.affine.copy(), tuple(data.shape), str(p))


SAME_GRID_ATOL = 1e-3  # affine entries closer than this (mm) count as the same grid


def same_grid(a: Volume, b: Volume, *, atol_mm: float = SAME_GRID_ATOL) -> bool:
    """True when ``a`` and ``b`` share shape and voxel -> world affine (the one same-grid test of the project)."""
    return tuple(a.shape) == tuple(b.shape) and bool(np.allclose(a.affine, b.affine, atol=atol_mm))


def check_same_grid(image: Volume, labels: Volume, *, atol_mm: float = SAME_GRID_ATOL) -> None:
    """Raise :class:`DinoregError` unless ``labels`` lie on the grid of ``image`` (shape and affine)."""
    if not same_grid(image, labels, atol_mm=atol_mm):
        raise DinoregError(
            f"The label file {labels.path} (shape {labels.shape}) is not on the grid of its image {image.path} "
            f"(shape {image.shape}); labels must share the image's shape and affine.")


# --------------------------------------------------------------------------------------------- writing

def to_original_orientation(array: np.ndarray, ref: Volume) -> np.ndarray:
    """Reorder a canonical (...,D,H,W) array back into the voxel order of ``ref``'s file.

    Works for (D,H,W) and for (C,D,H,W) arrays (spatial axes are the last three). Vector-valued arrays
    need their components transformed too: use :func:`displacement_to_original`.
    """
    # Orientation that takes canonical (RAS) axes onto the file's own axes.
    back = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt(("R", "A", "S")),
        nib.orientations.axcodes2ornt(nib.orientations.aff2axcodes(ref.original_affine)))
    if array.ndim == 3:
        return np.ascontiguousarray(nib.orientations.apply_orientation(array, back))
    lead = array.shape[:-3]
    flat = array.reshape((-1,) + array.shape[-3:])
    out = np.stack([nib.orientations.apply_orientation(a, back) for a in flat])
    return np.ascontiguousarray(out.reshape(lead + out.shape[-3:]))


def canonical_to_original_matrix(ref: Volume) -> np.ndarray:
    """(3,3) signed permutation taking a vector in canonical voxel units to the file's voxel units."""
    t = np.linalg.inv(ref.original_affine) @ ref.affine
    return np.round(t[:3, :3]).astype(np.float64)


def displacement_to_original(disp: np.ndarray, ref: Volume) -> np.ndarray:
    """Express a canonical (3,D,H,W) voxel displacement in the voxel axes of ``ref``'s file.

    Both the grid and the vector components are reoriented; the result is (3,D',H',W') in file voxel units.
    """
    m = canonical_to_original_matrix(ref)
    vec = np.einsum("ij,j...->i...", m, disp)
    return to_original_orientation(vec.astype(np.float32), ref)


def displacement_to_world(disp: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Convert a (3,D,H,W) voxel displacement into millimetres along the world (RAS) axes.

    ``affine`` is the (4,4) voxel -> world matrix of the grid the field lives on.
    """
    return np.einsum("ij,j...->i...", np.asarray(affine)[:3, :3], disp).astype(np.float32)


def _atomic_nifti(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, header=None) -> Path:
    path = Path(path)
    if not path.parent.exists():
        raise DinoregError(f"The output folder {path.parent} does not exist.")
    img = nib.Nifti1Image(data, affine, header)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    try:
        with atomic_path(path) as tmp:
            nib.save(img, str(tmp))
    except PermissionError:
        raise DinoregError(f"The output file {path} cannot be written (permission denied).") from None
    except OSError as e:
        raise DinoregError(f"The output file {path} cannot be written ({e.strerror or e}).") from None
    return path


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike) -> Path:
    """Write ``array`` with ``affine`` to ``path`` as it is (no reorientation), atomically."""
    return _atomic_nifti(np.asarray(array), np.asarray(affine, dtype=np.float64), path)


def save_image(array: np.ndarray, ref: Volume, path: str | os.PathLike) -> Path:
    """Write a canonical (D,H,W) image on ``ref``'s grid back in ``ref``'s own orientation (float32)."""
    return _atomic_nifti(to_original_orientation(np.asarray(array, np.float32), ref), ref.original_affine, path)


def save_labels(array: np.ndarray, ref: Volume, path: str | os.PathLike) -> Path:
    """Write a canonical (D,H,W) label map on ``ref``'s grid in ``ref``'s own orientation (int16/int32)."""
    a = np.asarray(array)
    dtype = np.int16 if a.size == 0 or (a.max() < 32767 and a.min() >= 0) else np.int32
    return _atomic_nifti(to_original_orientation(a.astype(dtype), ref), ref.original_affine, path)


def save_displacement(disp: np.ndarray, ref: Volume, path: str | os.PathLike) -> Path:
    """Write a canonical (3,D,H,W) voxel displacement as a (D',H',W',3) NIfTI in ``ref``'s file voxel axes.

    The stored field follows the Learn2Reg convention for the file as stored: for a voxel index x of the fixed
    file, the moving file is sampled at ``x + disp[x]`` (voxel units of the fixed file, channel k = file axis k).
    """
    d = displacement_to_original(np.asarray(disp, np.float32), ref)
    return _atomic_nifti(np.moveaxis(d, 0, -1).astype(np.float32), ref.original_affine, path)


def load_displacement(path: str | os.PathLike, ref: Volume) -> np.ndarray:
    """Read a (D,H,W,3) displacement written by :func:`save_displacement` back as canonical (3,D,H,W)."""
    p = _check_path(path, "displacement")
    try:
        data = np.asarray(nib.load(str(p)).dataobj, dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - reported as one sentence
        raise DinoregError(f"The displacement file {p} could not be read ({e}).") from None
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim != 4 or data.shape[-1] != 3:
        raise DinoregError(f"The displacement file {p} has shape {data.shape}; expected (D,H,W,3).")
    d = np.moveaxis(data, -1, 0)
    ornt = canonical_transform(ref.original_affine)
    grid = np.stack([nib.orientations.apply_orientation(c, ornt) for c in d])
    m = np.linalg.inv(canonical_to_original_matrix(ref))
    return np.einsum("ij,j...->i...", m, grid).astype(np.float32)


# ---------------------------------------------------------------------------------------- Learn2Reg

_CASE_RE = re.compile(r"_(\d{4})_(\d{4})\.nii(\.gz)?$")


def l2r_case_id(path: str | os.PathLike) -> int:
    """The case number of a Learn2Reg file name ``TASK_CCCC_MMMM.nii.gz`` (CCCC)."""
    m = _CASE_RE.search(str(path))
    if not m:
        raise DinoregError(f"The file name {Path(path).name} does not follow the Learn2Reg TASK_CCCC_MMMM.nii.gz pattern.")
    return int(m.group(1))


def l2r_displacement_name(fixed_path: str | os.PathLike, moving_path: str | os.PathLike) -> str:
    """Learn2Reg submission file name ``disp_FFFF_MMMM.nii.gz`` for a pair."""
    return f"disp_{l2r_case_id(fixed_path):04d}_{l2r_case_id(moving_path):04d}.nii.gz"


def save_l2r_displacement(disp: np.ndarray, ref: Volume, out_dir: str | os.PathLike, fixed_path, moving_path) -> Path:
    """Write a Learn2Reg submission file ``disp_FFFF_MMMM.nii.gz`` (D,H,W,3 voxels) into ``out_dir``."""
    return save_displacement(disp, ref, Path(out_dir) / l2r_displacement_name(fixed_path, moving_path))


@dataclass
class L2RPair:
    """One registration pair of a Learn2Reg dataset (absolute paths; labels/masks None when absent)."""

    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_mask: Path | None = None
    moving_mask: Path | None = None

    @property
    def name(self) -> str:
        return f"{l2r_case_id(self.fixed):04d}_{l2r_case_id(self.moving):04d}"


@dataclass
class L2RDataset:
    """A parsed Learn2Reg ``<TASK>_dataset.json``.

    Attributes:
        root: folder holding the json, ``imagesTr/``, ``labelsTr/`` and ``masksTr/``.
        name: the task name (e.g. ``AbdomenCTCT``).
        labels: label id -> name (background excluded).
        pairs: pair-list name (``registration_val``, ``registration_test``, ``training_paired_images``, ...)
            -> list of :class:`L2RPair`.
        raw: the whole JSON.
    """

    root: Path
    name: str
    labels: dict[int, str]
    pairs: dict[str, list[L2RPair]]
    raw: dict


def _sibling(root: Path, image_rel: str, folder: str) -> Path | None:
    p = (root / image_rel).resolve()
    cand = p.parent.parent / folder / p.name
    return cand if cand.exists() else None


def read_l2r_dataset(json_path: str | os.PathLike) -> L2RDataset:
    """Parse a Learn2Reg ``*_dataset.json`` (or the folder holding exactly one) into an :class:`L2RDataset`."""
    jp = Path(json_path)
    if jp.is_dir():
        found = sorted(jp.glob("*_dataset.json"))
        if len(found) != 1:
            raise DinoregError(f"The folder {jp} should hold exactly one *_dataset.json file, found {len(found)}.")
        jp = found[0]
    if not jp.exists():
        raise DinoregError(f"The dataset file {jp} does not exist.")
    try:
        raw = json.loads(jp.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DinoregError(f"The dataset file {jp} is not valid JSON ({e}).") from None
    root = jp.parent
    labels = {}
    for k, v in (raw.get("labels") or {}).items():
        if int(k) != 0:
            labels[int(k)] = v if isinstance(v, str) else str(v)
    pairs: dict[str, list[L2RPair]] = {}
    for key, val in raw.items():
        if not isinstance(val, list) or not val or not isinstance(val[0], dict) or "fixed" not in val[0]:
            continue
        lst = []
        for item in val:
            f, m = (root / item["fixed"]).resolve(), (root / item["moving"]).resolve()
            lst.append(L2RPair(f, m, _sibling(root, item["fixed"], "labelsTr"), _sibling(root, item["moving"], "labelsTr"),
                               _sibling(root, item["fixed"], "masksTr"), _sibling(root, item["moving"], "masksTr")))
        pairs[key] = lst
    name = raw.get("name") or jp.name.replace("_dataset.json", "")
    return L2RDataset(root, name, labels, pairs, raw)
