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
GRID_ATOL_MM = 1e-3  # voxel sizes closer than this are the same grid


def l2r_case_modality(path: str | os.PathLike) -> tuple[str, str]:
    """(case, modality) of a Learn2Reg file name ``TASK_CCCC_MMMM.nii.gz``, as 4-digit strings."""
    m = _CASE_RE.search(str(path))
    if not m:
        raise DinoregError(f"The file name {Path(path).name} does not follow the Learn2Reg TASK_CCCC_MMMM.nii.gz pattern.")
    return m.group(1), m.group(2)


def l2r_case_id(path: str | os.PathLike) -> int:
    """The case number of a Learn2Reg file name ``TASK_CCCC_MMMM.nii.gz`` (CCCC)."""
    return int(l2r_case_modality(path)[0])


def l2r_short_name_allowed(fixed_modality: str, moving_modality: str) -> bool:
    """Whether the official evaluation looks for the short name ``disp_FFFF_MMMM`` for this modality pair.

    It does for equal modalities and for fixed ``0000`` <- moving ``0001``; for every other pattern it looks only
    for the full name ``disp_FFFF_ffff_MMMM_mmmm`` (and ignores a short one).
    """
    return fixed_modality == moving_modality or (fixed_modality == "0000" and moving_modality == "0001")


def l2r_displacement_name(fixed_path: str | os.PathLike, moving_path: str | os.PathLike) -> str:
    """The Learn2Reg submission file name the official evaluation expects for a pair (see
    :func:`l2r_short_name_allowed`): ``disp_FFFF_MMMM.nii.gz`` or ``disp_FFFF_ffff_MMMM_mmmm.nii.gz``."""
    fc, fm = l2r_case_modality(fixed_path)
    mc, mm = l2r_case_modality(moving_path)
    if l2r_short_name_allowed(fm, mm):
        return f"disp_{fc}_{mc}.nii.gz"
    return f"disp_{fc}_{fm}_{mc}_{mm}.nii.gz"


def whole_transform_coords(disp: np.ndarray, fixed: Volume, moving: Volume, world_transform: np.ndarray | None,
                           *, moving_file_axes: bool = False) -> np.ndarray:
    """Where each canonical fixed voxel samples the moving image, through the whole transform.

    The registration's point map is ``p -> p + u(p)`` (canonical fixed voxels) followed by the initial world
    transform ``T`` (fixed world -> moving world). This returns, for every canonical fixed voxel ``p``,
    ``inv(A_moving) @ T @ A_fixed @ (p + u(p))``.

    Args:
        disp: (3,D,H,W) canonical fixed-voxel displacement (the registration's deformable part).
        fixed, moving: the two volumes (canonical), with their file affines.
        world_transform: (4,4) fixed world -> moving world (identity when None).
        moving_file_axes: coordinates in the moving *file's* voxel axes (else its canonical axes).

    Returns:
        (3,D,H,W) float64 moving voxel coordinates.
    """
    t = np.eye(4) if world_transform is None else np.asarray(world_transform, dtype=np.float64)
    a_mov = moving.original_affine if moving_file_axes else moving.affine
    m = np.linalg.inv(a_mov) @ t @ fixed.affine
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in fixed.shape], indexing="ij"))
    q = grid + np.asarray(disp, dtype=np.float64)
    return np.einsum("ij,j...->i...", m[:3, :3], q) + m[:3, 3].reshape(3, 1, 1, 1)


def l2r_grid_problem(fixed: Volume, moving: Volume) -> str | None:
    """One sentence on why a Learn2Reg field cannot express this pair, or None when it can.

    The evaluation samples the moving file at ``identity + disp`` with the identity of the fixed file's grid, so
    the field is in voxels of one grid used for both: the two files must have the same shape and voxel size.
    """
    fs, ms = tuple(fixed.original_shape), tuple(moving.original_shape)
    fsp = np.linalg.norm(np.asarray(fixed.original_affine)[:3, :3], axis=0)
    msp = np.linalg.norm(np.asarray(moving.original_affine)[:3, :3], axis=0)
    if fs != ms or not np.allclose(fsp, msp, atol=GRID_ATOL_MM):
        return (f"No Learn2Reg displacement file was written: the fixed file (shape {fs}, voxels "
                f"{tuple(np.round(fsp, 3))} mm) and the moving file (shape {ms}, voxels {tuple(np.round(msp, 3))} mm) "
                f"are on different grids, which a Learn2Reg field in voxels of one grid cannot index.")
    return None


def l2r_whole_field(disp: np.ndarray, fixed: Volume, moving: Volume, world_transform: np.ndarray | None) -> np.ndarray:
    """The Learn2Reg submission field of the whole transform: (D',H',W',3) float32 in the fixed *file's* voxel axes.

    For a fixed file voxel x the official evaluation samples the moving file at ``x + field[x]``
    (``map_coordinates(moving, identity + field)``); this field makes that sample the point the registration
    (initial transform composed with the deformable part) maps x to. Raises :class:`DinoregError` when the two
    files are on different grids (see :func:`l2r_grid_problem`).
    """
    problem = l2r_grid_problem(fixed, moving)
    if problem:
        raise DinoregError(problem)
    coords = whole_transform_coords(disp, fixed, moving, world_transform, moving_file_axes=True)
    coords_file = to_original_orientation(coords, fixed)  # grid reordered; the values are moving file indices
    ident = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in coords_file.shape[1:]], indexing="ij"))
    return np.moveaxis(coords_file - ident, 0, -1).astype(np.float32)


def save_l2r_field(field: np.ndarray, fixed: Volume, path: str | os.PathLike) -> Path:
    """Write a (D',H',W',3) Learn2Reg field (from :func:`l2r_whole_field`) with the fixed file's affine."""
    return _atomic_nifti(np.asarray(field, np.float32), fixed.original_affine, path)


def save_l2r_displacement(disp: np.ndarray, ref: Volume, out_dir: str | os.PathLike, fixed_path, moving_path,
                          moving: Volume | None = None, world_transform: np.ndarray | None = None) -> Path:
    """Write the Learn2Reg submission file for a pair into ``out_dir`` under the name the evaluation expects.

    ``disp`` is the canonical deformable part; with ``moving`` (and ``world_transform``) the whole transform is
    written (:func:`l2r_whole_field`), else ``disp`` alone in the fixed file's voxel axes (same grid, no initial
    alignment).
    """
    target = Path(out_dir) / l2r_displacement_name(fixed_path, moving_path)
    if moving is None:
        return save_displacement(disp, ref, target)
    return save_l2r_field(l2r_whole_field(disp, ref, moving, world_transform), ref, target)


@dataclass
class L2RPair:
    """One registration pair of a Learn2Reg dataset (absolute paths; labels/masks None when absent)."""

    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    fixed_mask: Path | None = None
    moving_mask: Path | None = None
    fixed_keypoints: Path | None = None  # keypoints*/ csv (N,3 voxel coordinates), for TRE
    moving_keypoints: Path | None = None

    @property
    def name(self) -> str:
        return f"{l2r_case_id(self.fixed):04d}_{l2r_case_id(self.moving):04d}"

    @property
    def submission_name(self) -> str:
        """The file name the official evaluation expects for this pair (``disp_FFFF_MMMM.nii.gz`` or the long form)."""
        return l2r_displacement_name(self.fixed, self.moving)


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


def _sibling(root: Path, image_rel: str, folder: str, suffix: str | None = None) -> Path | None:
    p = (root / image_rel).resolve()
    name = p.name if suffix is None else re.sub(r"\.nii(\.gz)?$", suffix, p.name)
    cand = p.parent.parent / folder / name
    return cand if cand.exists() else None


def _keypoint_folder(image_rel: str, fixed_rel: str, moving_rel: str) -> str:
    """``keypointsTr`` for pairs of one modality (or 0000 <- 0001), ``keypointsXYTr`` otherwise (the evaluation's rule)."""
    split = Path(image_rel).parent.name.replace("images", "")  # "Tr" / "Ts"
    (_, fm), (_, mm) = l2r_case_modality(fixed_rel), l2r_case_modality(moving_rel)
    if l2r_short_name_allowed(fm, mm):
        return f"keypoints{split}"
    lo, hi = sorted([int(fm), int(mm)])
    return f"keypoints{lo}{hi}{split}"


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
            fk = mk = None
            if _CASE_RE.search(item["fixed"]) and _CASE_RE.search(item["moving"]):
                kp = _keypoint_folder(item["fixed"], item["fixed"], item["moving"])
                fk, mk = _sibling(root, item["fixed"], kp, ".csv"), _sibling(root, item["moving"], kp, ".csv")
            lst.append(L2RPair(f, m, _sibling(root, item["fixed"], "labelsTr"), _sibling(root, item["moving"], "labelsTr"),
                               _sibling(root, item["fixed"], "masksTr"), _sibling(root, item["moving"], "masksTr"),
                               fk, mk))
        pairs[key] = lst
    name = raw.get("name") or jp.name.replace("_dataset.json", "")
    return L2RDataset(root, name, labels, pairs, raw)
