"""The ITK/ANTs/Slicer export: SimpleITK (and antspyx where its venv exists) applying the exported transforms to
the moving files reproduces warped.nii.gz / warped_labels.nii.gz, for RAS- and LPS-stored inputs and with an
initial alignment; and the Learn2Reg file of the whole transform reproduces them through map_coordinates."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dinoreg_core import export_itk
from dinoreg_core.api import register

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK (in [dev]) is not installed")

PEERS_PY = Path(__file__).resolve().parents[1] / ".venv-peers" / "bin" / "python"
if not PEERS_PY.exists():
    PEERS_PY = Path("/work/main/.venv-peers/bin/python")
IMAGE_TOL = 0.01  # of the moving intensity range
LPS_FLIP = np.array([[-1, 0, 0], [0, -1, 0], [0, 0, 1.0]])


def _phantom(shape, seed):
    """A smooth blob image and a 3-label map on a (D,H,W) grid."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    lab = np.zeros(shape, np.int16)
    lab[(zz / 0.7) ** 2 + (yy / 0.6) ** 2 + (xx / 0.65) ** 2 < 1] = 1
    lab[((zz - 0.2) / 0.3) ** 2 + ((yy + 0.1) / 0.25) ** 2 + ((xx - 0.15) / 0.3) ** 2 < 1] = 2
    lab[((zz + 0.3) / 0.2) ** 2 + ((yy - 0.2) / 0.2) ** 2 + ((xx + 0.2) / 0.25) ** 2 < 1] = 3
    img = ndimage.gaussian_filter(lab.astype(np.float32) * 300 + rng.normal(0, 20, shape), 1.0) - 500
    return img.astype(np.float32), lab


def _write(path, arr, affine):
    nib.save(nib.Nifti1Image(arr, affine), str(path))
    return path


def _lps_affine(shape, spacing, origin):
    """An LPS-stored grid (voxel axes pointing Left, Posterior, Superior)."""
    a = np.eye(4)
    a[:3, :3] = np.diag([-spacing[0], -spacing[1], spacing[2]])
    a[:3, 3] = origin
    return a


def _register(tmp_path, *, fixed_lps: bool, moving_lps: bool, init: str, moving_shift_mm=(0.0, 0.0, 0.0)):
    shape = (36, 32, 28)
    sp = (3.0, 3.2, 3.5)
    fimg, flab = _phantom(shape, 0)
    # the moving subject: the same blobs slightly deformed and shifted
    coords = np.stack(np.meshgrid(*[np.arange(s, dtype=float) for s in shape], indexing="ij"))
    coords[0] += 1.2 * np.sin(coords[1] / 6.0)
    mimg = ndimage.map_coordinates(fimg, coords, order=1, mode="nearest").astype(np.float32)
    mlab = ndimage.map_coordinates(flab, coords, order=0, mode="nearest").astype(np.int16)
    ras = np.diag(list(sp) + [1.0])
    ras[:3, 3] = (-50.0, -40.0, 10.0)
    faff = ras.copy()
    if fixed_lps:  # same world grid, stored flipped along i and j
        fimg, flab = fimg[::-1, ::-1].copy(), flab[::-1, ::-1].copy()
        faff = ras @ np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    maff = ras.copy()
    maff[:3, 3] += moving_shift_mm
    if moving_lps:
        mimg, mlab = mimg[::-1, ::-1].copy(), mlab[::-1, ::-1].copy()
        maff = maff @ np.array([[-1, 0, 0, shape[0] - 1], [0, -1, 0, shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    d = tmp_path / "in"
    d.mkdir()
    paths = {"fixed": _write(d / "T_0001_0000.nii.gz", fimg, faff), "moving": _write(d / "T_0002_0000.nii.gz", mimg, maff),
             "fixed_labels": _write(d / "fl.nii.gz", flab, faff), "moving_labels": _write(d / "ml.nii.gz", mlab, maff)}
    out = tmp_path / "out"
    res = register(paths["fixed"], paths["moving"], fixed_labels=paths["fixed_labels"],
                   moving_labels=paths["moving_labels"], out_dir=out, init=init, export=("itk",),
                   grid_sp=4, disp_hw=2, iterations=30)
    return paths, out, res


def _inside(fixed, composite_path, moving_path, tol=1e-6):
    return export_itk.inside_moving_grid(sitk, fixed, composite_path, moving_path, tol)


CASES = {"ras_fixed_lps_moving": dict(fixed_lps=False, moving_lps=True, init="none"),
         "lps_both_same_grid": dict(fixed_lps=True, moving_lps=True, init="none"),
         "initial_alignment": dict(fixed_lps=True, moving_lps=False, init="com", moving_shift_mm=(12.0, -9.0, 6.0))}


@pytest.fixture(scope="module")
def all_registered(tmp_path_factory):
    return {name: _register(tmp_path_factory.mktemp(name), **kw) for name, kw in CASES.items()}


@pytest.fixture(params=list(CASES))
def registered(request, all_registered):
    return request.param, all_registered[request.param]


def test_simpleitk_applies_the_export_like_warped_nii(registered):
    name, (paths, out, res) = registered
    files = res.outputs
    for key in ("itk_composite", "itk_deformable", "itk_affine_tfm", "itk_affine_mat"):
        assert Path(files[key]).exists()
    if name == "initial_alignment":
        assert not np.allclose(res.init_transform, np.eye(4))
    hdr = nib.load(files["itk_composite"]).header
    assert hdr.get_intent()[0] == "displacement vector" and nib.load(files["itk_composite"]).shape[3:] == (1, 3)
    fixed = sitk.ReadImage(str(paths["fixed"]))
    moving = sitk.ReadImage(str(paths["moving"]), sitk.sitkFloat32)
    mlab = sitk.ReadImage(str(paths["moving_labels"]))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    warped_lab = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
    inside = _inside(fixed, files["itk_composite"], paths["moving"])
    assert inside.mean() > 0.7
    rng = float(np.ptp(sitk.GetArrayFromImage(moving)))
    composite = sitk.DisplacementFieldTransform(sitk.ReadImage(files["itk_composite"], sitk.sitkVectorFloat64))
    two_part = sitk.CompositeTransform([sitk.ReadTransform(files["itk_affine_tfm"]), sitk.DisplacementFieldTransform(
        sitk.ReadImage(files["itk_deformable"], sitk.sitkVectorFloat64))])
    mat_part = sitk.CompositeTransform([sitk.ReadTransform(files["itk_affine_mat"]), sitk.DisplacementFieldTransform(
        sitk.ReadImage(files["itk_deformable"], sitk.sitkVectorFloat64))])
    for tx in (composite, two_part, mat_part):
        img = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, tx, sitk.sitkLinear, 0.0))
        assert np.abs(img - warped)[inside].max() <= IMAGE_TOL * rng
        lab = sitk.GetArrayFromImage(sitk.Resample(mlab, fixed, tx, sitk.sitkNearestNeighbor, 0))
        assert (lab[inside] == warped_lab[inside]).all()


def test_learn2reg_file_of_the_whole_transform_reproduces_warped_labels(registered):
    name, (paths, out, res) = registered
    l2r = res.metrics["learn2reg"]
    assert l2r["file"] and Path(l2r["file"]).name == "disp_0001_0002.nii.gz"
    field = np.asarray(nib.load(l2r["file"]).dataobj, dtype=np.float64)
    mlab = np.asarray(nib.load(str(paths["moving_labels"])).dataobj)
    ident = np.stack(np.meshgrid(*[np.arange(s) for s in field.shape[:3]], indexing="ij"))
    coords = ident + np.moveaxis(field, -1, 0)
    warped = ndimage.map_coordinates(mlab, coords, order=0)
    ours = np.asarray(nib.load(str(out / "warped_labels.nii.gz")).dataobj)
    inside = np.all((coords >= 0) & (coords <= np.array(mlab.shape).reshape(3, 1, 1, 1) - 1), axis=0)
    assert (warped[inside] == ours[inside]).all()
    summary = res.metrics["summary"]
    assert l2r["dice"] == pytest.approx(summary["dice"], abs=1e-9)


def test_affine_files_hold_the_initial_alignment_in_lps(tmp_path):
    t = np.eye(4)
    t[:3, :3] = [[0.98, -0.1, 0.02], [0.1, 0.99, 0.0], [0.0, 0.03, 1.01]]
    t[:3, 3] = (4.0, -7.0, 2.5)
    tfm = sitk.ReadTransform(str(export_itk.save_itk_affine_tfm(t, tmp_path / "a.tfm")))
    mat = sitk.ReadTransform(str(export_itk.save_itk_affine_mat(t, tmp_path / "a.mat")))
    p_ras = np.array([10.0, -20.0, 30.0])
    expected_lps = LPS_FLIP @ (t[:3, :3] @ p_ras + t[:3, 3])
    for tx in (tfm, mat):
        np.testing.assert_allclose(tx.TransformPoint(tuple(LPS_FLIP @ p_ras)), expected_lps, atol=1e-9)


@pytest.mark.skipif(not PEERS_PY.exists(), reason="antspyx venv (.venv-peers, make peers-env) is not installed")
def test_antspyx_applies_the_composite_like_warped_nii(all_registered, tmp_path):
    jobs = [{"fixed": str(p["fixed"]), "moving": str(p["moving"]), "labels": str(p["moving_labels"]),
             "tx": res.outputs["itk_composite"], "out": str(tmp_path / name)}
            for name, (p, out, res) in all_registered.items()]
    script = tmp_path / "apply.py"
    script.write_text(
        "import sys, json, ants\n"
        "for j in json.loads(sys.argv[1]):\n"
        "    fi = ants.image_read(j['fixed'])\n"
        "    w = ants.apply_transforms(fi, ants.image_read(j['moving']), [j['tx']], interpolator='linear')\n"
        "    wl = ants.apply_transforms(fi, ants.image_read(j['labels']), [j['tx']], interpolator='nearestNeighbor')\n"
        "    ants.image_write(w, j['out'] + '_img.nii.gz'); ants.image_write(wl, j['out'] + '_lab.nii.gz')\n")
    r = subprocess.run([str(PEERS_PY), str(script), json.dumps(jobs)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0 and "No module named 'ants'" in r.stderr:
        pytest.skip("antspyx is not importable in the peers venv")
    assert r.returncode == 0, r.stderr
    for name, (paths, out, res) in all_registered.items():
        fixed = sitk.ReadImage(str(paths["fixed"]))
        inside = _inside(fixed, res.outputs["itk_composite"], paths["moving"])
        assert inside.mean() > 0.7, name
        warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
        ants_img = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{name}_img.nii.gz")))
        rng = float(np.ptp(np.asarray(nib.load(str(paths["moving"])).dataobj)))
        assert np.abs(ants_img - warped)[inside].max() <= IMAGE_TOL * rng, name
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{name}_lab.nii.gz")))
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped_labels.nii.gz")))
        assert (np.rint(lab[inside]) == ours[inside]).all(), name
