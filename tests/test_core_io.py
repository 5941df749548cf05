"""NIfTI I/O: canonical orientation, writing back in the input's space, bad files."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from dinoreg_core import io
from dinoreg_core.errors import DinoregError


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


def _lps_copy(data, ras_affine):
    """The same image stored with flipped first two axes (LPS voxel order) and the matching affine."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[0, 3] = data.shape[0] - 1
    flip[1, 3] = data.shape[1] - 1
    return data[::-1, ::-1, :].copy(), ras_affine @ flip


def test_ras_and_lps_files_load_to_the_same_canonical_array(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 6, 5)).astype(np.float32)
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    aff[:3, 3] = [10, -20, 5]
    lps, lps_aff = _lps_copy(data, aff)
    a = io.load_volume(_write(tmp_path / "ras.nii.gz", data, aff))
    b = io.load_volume(_write(tmp_path / "lps.nii.gz", lps, lps_aff))
    assert nib.aff2axcodes(lps_aff) == ("L", "P", "S")
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)
    assert a.spacing == (2.0, 3.0, 4.0)


def test_save_writes_back_in_the_input_orientation(tmp_path):
    rng = np.random.default_rng(1)
    data, aff = _lps_copy(rng.normal(size=(6, 5, 4)).astype(np.float32), np.eye(4))
    vol = io.load_volume(_write(tmp_path / "lps.nii.gz", data, aff))
    out = io.save_image(vol.array * 2, vol, tmp_path / "out.nii.gz")
    img = nib.load(str(out))
    np.testing.assert_allclose(img.affine, aff)
    np.testing.assert_allclose(img.get_fdata(), data * 2, rtol=1e-6)


def test_displacement_components_follow_the_reorientation(tmp_path):
    # A canonical field that moves +1 voxel along canonical axis 0 (towards R) is -1 along the LPS file's axis 0.
    data, aff = _lps_copy(np.zeros((6, 5, 4), np.float32), np.eye(4))
    vol = io.load_volume(_write(tmp_path / "lps.nii.gz", data, aff))
    disp = np.zeros((3, *vol.shape), np.float32)
    disp[0] = 1.0
    disp[2] = 0.5
    p = io.save_displacement(disp, vol, tmp_path / "disp.nii.gz")
    stored = nib.load(str(p)).get_fdata()
    assert stored.shape == (6, 5, 4, 3)
    np.testing.assert_allclose(stored[..., 0], -1.0)
    np.testing.assert_allclose(stored[..., 2], 0.5)
    np.testing.assert_allclose(io.load_displacement(p, vol), disp)


def test_real_mr_is_lps_and_loads_as_ras(real_dir):
    mr = io.load_volume(real_dir / "mr_upper_abdomen.nii.gz")
    assert nib.aff2axcodes(mr.original_affine) == ("L", "P", "S")
    assert nib.aff2axcodes(mr.affine) == ("R", "A", "S")
    assert mr.array.dtype == np.float32 and mr.shape == (117, 91, 20)
    lab = io.load_labels(real_dir / "mr_upper_abdomen_labels.nii.gz")
    io.check_same_grid(mr, lab)


@pytest.mark.parametrize("case", ["missing", "corrupt", "truncated", "4d", "nan", "text"])
def test_bad_image_files_give_one_sentence(tmp_path, case):
    p = tmp_path / "img.nii.gz"
    if case == "corrupt":
        p.write_bytes(b"this is not a nifti file at all")
    elif case == "truncated":
        _write(p, np.ones((20, 20, 20), np.float32), np.eye(4))
        raw = gzip.decompress(p.read_bytes())
        p.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    elif case == "4d":
        _write(p, np.ones((4, 4, 4, 3), np.float32), np.eye(4))
    elif case == "nan":
        d = np.ones((4, 4, 4), np.float32)
        d[1, 1, 1] = np.nan
        _write(p, d, np.eye(4))
    elif case == "text":
        p = tmp_path / "img.txt"
        p.write_text("x")
    with pytest.raises(DinoregError) as e:
        io.load_volume(p)
    msg = str(e.value)
    assert str(p.name) in msg and "\n" not in msg


def test_label_checks(tmp_path):
    empty = _write(tmp_path / "empty.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))
    with pytest.raises(DinoregError, match="empty"):
        io.load_labels(empty)
    frac = _write(tmp_path / "frac.nii.gz", np.full((4, 4, 4), 0.5, np.float32), np.eye(4))
    with pytest.raises(DinoregError, match="non-integer"):
        io.load_labels(frac)
    img = io.load_volume(_write(tmp_path / "img.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4)))
    lab = io.load_labels(_write(tmp_path / "lab.nii.gz", np.ones((4, 4, 5), np.int16), np.eye(4)))
    with pytest.raises(DinoregError, match="not on the grid"):
        io.check_same_grid(img, lab)


def test_l2r_names_and_dataset_json(tmp_path):
    assert io.l2r_displacement_name("AbdomenCTCT_0001_0000.nii.gz", "x/AbdomenCTCT_0012_0000.nii.gz") == \
        "disp_0001_0012.nii.gz"
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for c in (1, 2):
        _write(tmp_path / "imagesTr" / f"T_{c:04d}_0000.nii.gz", np.ones((4, 4, 4), np.float32), np.eye(4))
        _write(tmp_path / "labelsTr" / f"T_{c:04d}_0000.nii.gz", np.ones((4, 4, 4), np.int16), np.eye(4))
    (tmp_path / "T_dataset.json").write_text(
        '{"name": "T", "labels": {"0": "background", "1": "liver"}, "registration_val": '
        '[{"fixed": "./imagesTr/T_0001_0000.nii.gz", "moving": "./imagesTr/T_0002_0000.nii.gz"}]}')
    ds = io.read_l2r_dataset(tmp_path)
    assert ds.labels == {1: "liver"}
    (pair,) = ds.pairs["registration_val"]
    assert pair.name == "0001_0002" and pair.fixed_labels is not None and pair.fixed_mask is None
