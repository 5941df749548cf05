"""One synthetic subject: API, grid and orientation, determinism, anatomical layout (also against the real CT)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinoreg_core.data.phantom import LABELS, PhantomConfig, generate_subject, subject_seed
from dinoreg_core.errors import DinoregError

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"
SMALL = PhantomConfig(spacing_mm=6.0, shape=(64, 52, 56))  # the default field of view at 6 mm


@pytest.fixture(scope="module")
def subject():
    return generate_subject(11, SMALL, mr_contrast="t2")


def _centroid(labels, k):
    return np.argwhere(labels == k).mean(0)


def test_config_defaults_and_validation():
    cfg = PhantomConfig()
    assert cfg.n_subjects == 16 and cfg.spacing_mm == 3.0 and len(cfg.shape) == 3
    assert cfg.mr_cases() == [1, 3, 5, 7, 10, 12, 14, 16]  # mr_fraction 0.5, spread evenly
    assert PhantomConfig(mr_subjects=(4, 2)).mr_cases() == [2, 4]
    assert PhantomConfig(modalities=("CT",)).mr_cases() == []
    for bad in (dict(n_subjects=0), dict(spacing_mm=-1.0), dict(shape=(8, 8)), dict(mr_fraction=1.5),
                dict(mr_contrasts=("t3",)), dict(ct_phases=("delayed",)), dict(mr_subjects=(17,)),
                dict(modalities=("MR",)), dict(task="a b"), dict(workers=0)):
        with pytest.raises(DinoregError):
            PhantomConfig(**bad).validate()


def test_subject_arrays_grid_and_ras_orientation(subject):
    s = subject
    shape = SMALL.shape
    for key, dtype in (("ct", np.float32), ("mr", np.float32), ("labels", np.uint8), ("mr_labels", np.uint8),
                       ("mask", np.uint8), ("mr_mask", np.uint8), ("tissue", np.uint8)):
        assert s[key].shape == shape and s[key].dtype == dtype, key
    assert nib.aff2axcodes(s["affine"]) == ("R", "A", "S")
    assert np.allclose(np.diag(s["affine"])[:3], 6.0)
    # the field-of-view centre is the world origin
    assert np.allclose(s["affine"][:3, :3] @ ((np.array(shape) - 1) / 2) + s["affine"][:3, 3], 0.0)
    for lab in ("labels", "mr_labels"):
        assert set(np.unique(s[lab]).tolist()) == set(range(14)), lab  # all 13 organs present
    assert np.all(s["mask"][s["labels"] > 0] == 1) and 0.2 < s["mask"].mean() < 0.9
    assert s["ct"].min() >= -1024 and s["ct"].max() > 700  # air and cortical bone
    assert s["mr"].min() >= 0.0
    assert s["meta"]["mr_contrast"] == "t2" and s["meta"]["ct_phase"] in ("native", "arterial", "portal")


def test_same_seed_same_subject_other_seed_other_subject(subject):
    again = generate_subject(11, SMALL, mr_contrast="t2")
    for key in ("ct", "mr", "labels", "mr_labels"):
        assert np.array_equal(again[key], subject[key]), key
    other = generate_subject(12, SMALL, with_mr=False)
    assert "mr" not in other
    assert (other["labels"] != subject["labels"]).mean() > 0.01
    # the CT does not depend on whether an MR is made
    ct_only = generate_subject(11, SMALL, with_mr=False)
    assert np.array_equal(ct_only["ct"], subject["ct"])


def test_anatomical_layout(subject):
    lab = subject["labels"]
    c = {k: _centroid(lab, k) for k in LABELS}
    mid = (np.array(SMALL.shape) - 1) / 2
    # axis 0 -> patient's right: liver, right kidney, IVC, gallbladder right; spleen, left kidney, stomach left
    assert c[6][0] > mid[0] > c[1][0]
    assert c[2][0] > mid[0] > c[3][0] and c[7][0] < mid[0]
    assert c[9][0] > c[8][0]  # IVC right of the aorta
    # axis 1 -> anterior: gallbladder and pancreas in front of the aorta, aorta in front of the kidneys' hila
    assert c[4][1] > c[8][1] and c[11][1] > c[8][1]
    # axis 2 -> superior: liver and spleen above the kidneys, right kidney lower than the left one
    assert c[6][2] > c[2][2] and c[1][2] > c[3][2] and c[3][2] > c[2][2]
    # the liver is the largest organ, adrenal glands the smallest
    vol = {k: int((lab == k).sum()) for k in LABELS}
    assert max(vol, key=vol.get) == 6 and min(vol, key=vol.get) in (12, 13)


@pytest.mark.skipif(not (REAL / "ct_abdomen_pelvis_labels.nii.gz").exists(),
                    reason="the real CT (../shared/data/real/ct_abdomen_pelvis_labels.nii.gz) is not available")
def test_liver_and_spleen_on_the_same_sides_as_in_the_real_ct():
    from dinoreg_core.io import load_labels

    real = load_labels(REAL / "ct_abdomen_pelvis_labels.nii.gz")  # TotalSegmentator ids: 5 liver, 1 spleen
    assert nib.aff2axcodes(real.affine) == ("R", "A", "S")
    r_liver, r_spleen = _centroid(real.array, 5), _centroid(real.array, 1)
    for case in (1, 2, 3):
        s = generate_subject(subject_seed(0, case), SMALL, with_mr=False)
        p_liver, p_spleen = _centroid(s["labels"], 6), _centroid(s["labels"], 1)
        # same side along every axis, in relative array coordinates
        rel_r = (r_liver - r_spleen) / np.array(real.shape)
        rel_p = (p_liver - p_spleen) / np.array(SMALL.shape)
        assert np.sign(rel_p[0]) == np.sign(rel_r[0]) == 1.0  # liver at higher axis-0 index (patient's right)
        assert abs(rel_p[0] - rel_r[0]) < 0.25
        # and on the same halves of the grid
        assert (p_liver[0] > SMALL.shape[0] / 2) == (r_liver[0] > real.shape[0] / 2)
        assert (p_spleen[0] > SMALL.shape[0] / 2) == (r_spleen[0] > real.shape[0] / 2)
