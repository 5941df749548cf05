"""Initial alignment of scans that share only part of their field of view (real CT cut in two, header moved)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from dinoreg_core import io
from dinoreg_core.errors import DinoregError
from dinoreg_core.registration.initial import InitConfig, initial_alignment, initial_alignment_report
from dinoreg_core.evaluation.partial_fov_cases import rigid_about, shared_dice, split_scan

# small volumes keep the test fast: 6 mm scans, search on 10 mm, final refinement on 6 mm
FAST = InitConfig(search_mm=10.0, refine_mm=6.0, iterations=80)
ROTATION_DEG = (5.0, -8.0, 15.0)        # about 18 degrees in all
SHIFT_MM = (120.0, -80.0, 150.0)        # about 208 mm


@pytest.fixture(scope="module")
def case(real_dir):
    ct = io.load_volume(real_dir / "ct_abdomen_pelvis.nii.gz")
    lab = io.load_labels(real_dir / "ct_abdomen_pelvis_labels.nii.gz")
    return split_scan(ct, lab, 0.4, 0.7, rotation_deg=ROTATION_DEG, shift_mm=SHIFT_MM, spacing_mm=6.0)


def test_the_case_is_partial_and_moved(case):
    assert all(0.3 <= f <= 0.5 for f in case.shared_extent), case.shared_extent
    r = case.true_transform[:3, :3]
    angle = np.degrees(np.arccos((np.trace(r) - 1) / 2))
    assert 10 <= angle <= 20
    centre = case.moving.affine[:3, :3] @ ((np.array(case.moving.shape) - 1) / 2) + case.moving.affine[:3, 3]
    before = np.linalg.inv(case.true_transform) @ np.append(centre, 1.0)
    assert 100 <= np.linalg.norm(centre - before[:3]) <= 300


def test_affine_init_finds_the_shared_part(case):
    true_dice, _ = shared_dice(case, case.true_transform)
    com_dice, _ = shared_dice(case, initial_alignment(case.fixed, case.moving, "com",
                                                      fixed_modality="ct", moving_modality="ct"))
    t, rep = initial_alignment_report(case.fixed, case.moving, "affine", fixed_modality="ct", moving_modality="ct",
                                      cfg=FAST)
    dice, _ = shared_dice(case, t)
    assert com_dice < true_dice - 0.3           # the centre of mass assumes the same body region
    assert dice >= true_dice - 0.05, (dice, true_dice)
    assert rep.method == "affine" and rep.score >= FAST.min_score and rep.shared_fraction >= FAST.min_overlap
    assert rep.chosen in {c["start"] for c in rep.candidates}
    json.dumps(rep.as_dict())                   # goes into metrics.json as it is


def test_unrelated_scan_is_refused(case):
    rng = np.random.default_rng(0)
    noise = ndimage.gaussian_filter(rng.normal(size=case.moving.shape), 1.5)
    body = np.zeros(case.moving.shape, bool)
    body[8:-8, 8:-8, 4:-4] = True
    arr = np.where(body, 400.0 * noise / noise.std(), -1000.0).astype(np.float32)
    junk = io.Volume(arr, rigid_about((0, 0, 0), (0, 0, 30), (0, 0, 0)) @ case.moving.affine)
    with pytest.raises(DinoregError, match="no plausible common anatomy"):
        initial_alignment_report(case.fixed, junk, "affine", fixed_modality="ct", moving_modality="ct", cfg=FAST)


def test_none_and_com_reports(case):
    t, rep = initial_alignment_report(case.fixed, case.moving, "none")
    assert np.array_equal(t, np.eye(4)) and rep.chosen == "none" and rep.score is None
    with pytest.raises(DinoregError, match="Unknown initial alignment"):
        initial_alignment_report(case.fixed, case.moving, "rigid")
