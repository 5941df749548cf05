"""Pins the registration pipeline's outputs, so a refactor of the stages shows it changed nothing.

The pair: a 48x56x48 crop of the real CT (../shared/data/real) warped by a known smooth random field, and the same
moving scan shifted 6 mm in world space and cut to a partial field of view (so the resampling onto the fixed grid and
the covered-box crop are exercised). Each case's displacement, warped labels and Dice are compared with the values the
code produced when the pins were written (``tests/data/pipeline_pins.json``).

Bit identity only holds on one CPU model: float rounding differs between machines (vector widths, libm), and 40
Adam iterations amplify a 1e-7 difference to ~0.1 voxel at a few voxels (the autograd path against itself with its
features perturbed by 1e-7 moved up to 0.087 voxel). So the pins compare within tolerances far below what a real
change of the code moves (a wrong gradient side at on-voxel points moved the field 0.71 voxel and Dice 0.066):

* the displacement at every ``DISP_STRIDE``-th voxel of each axis (stored): mean |difference| <= ``DISP_MEAN_TOL``
  voxel and max <= ``DISP_MAX_TOL`` voxel;
* Dice per label and the summary metrics within ``METRIC_TOL``; SDlogJ and folding within ``FIELD_TOL``;
* the warped labels (per-label voxel counts) within ``LABEL_COUNT_TOL`` of each label's count; the moving image on
  the fixed grid: mean |difference| <= ``IMAGE_TOL`` of its range;
* the registered box and the list of outputs exactly.

The SHA-256 of the displacement's float32 bytes is stored as well, and reported (not asserted) when it differs.

Regenerate the pins only when a change of results is intended:
``PYTHONPATH=. python tests/test_pipeline_pins.py`` (and say why in the commit message).
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dinoreg_core import io
from dinoreg_core.api import register
from dinoreg_core.registration.warp import smooth_random_field, warp, warp_labels

PINS = Path(__file__).resolve().parent / "data" / "pipeline_pins.json"
CROP = (slice(40, 88), slice(30, 86), slice(60, 108))  # 48x56x48 voxels of the real CT (3 mm), abdomen
MAX_DISP_VOX = 4.0  # largest vector of the known field (voxels)
SHIFT_MM = 6.0  # world shift of the moving scan in the "shifted" cases
DISP_STRIDE = 8  # stored displacement subsample (voxels)
DISP_MEAN_TOL = 0.01  # voxel
DISP_MAX_TOL = 0.25  # voxel
METRIC_TOL = 0.005  # Dice, HD95 (mm and voxels)
FIELD_TOL = 0.005  # SDlogJ, folding (%)
LABEL_COUNT_TOL = 0.01  # fraction of a label's voxel count
IMAGE_TOL = 1e-3  # fraction of the moving image's range
SMALL = {"grid_sp": 6, "disp_hw": 4, "iterations": 40, "grid_sp_adam": 3}
CASES = {
    "mind": dict(features="mind", **SMALL),
    "intensity": dict(features="intensity", **SMALL),
    "mind_shifted": dict(features="mind", shifted=True, **SMALL),
    "dino3d": dict(features="dino3d", pca_dim=6, **SMALL),
}


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _weights_sha() -> str:
    from dinoreg_core.features.dino3d import DEFAULT_WEIGHTS

    return hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest() if DEFAULT_WEIGHTS.exists() else ""


def disp_subsample(d: np.ndarray) -> np.ndarray:
    """(3,D,H,W) displacement (voxels) -> every ``DISP_STRIDE``-th voxel of each spatial axis, rounded to 1e-6."""
    return np.squeeze(d)[:, ::DISP_STRIDE, ::DISP_STRIDE, ::DISP_STRIDE].round(6)


def make_pair(real: Path, shifted: bool):
    """(fixed, moving, fixed labels, moving labels) Volumes of the pinned pair."""
    ct = io.load_volume(real / "ct_abdomen_pelvis.nii.gz")
    lab = io.load_labels(real / "ct_abdomen_pelvis_labels.nii.gz")
    aff = ct.affine.copy()
    aff[:3, 3] = aff[:3, :3] @ np.array([c.start for c in CROP], float) + aff[:3, 3]
    img = ct.array[CROP].astype(np.float32)
    labels = lab.array[CROP].astype(np.int32)
    labels = np.where(np.isin(labels, [1, 2, 3, 5, 6]), labels, 0).astype(np.int32)
    v = smooth_random_field(img.shape, max_disp=MAX_DISP_VOX, control_spacing=12, seed=3)
    with torch.no_grad():
        mov = warp(torch.from_numpy(img)[None, None], v)[0, 0].numpy()
        mlab = warp_labels(torch.from_numpy(labels)[None, None], v)[0, 0].numpy().astype(np.int32)
    fixed, flab = io.Volume(img, aff), io.Volume(labels, aff.copy())
    if not shifted:
        return fixed, io.Volume(mov, aff.copy()), flab, io.Volume(mlab, aff.copy())
    maff = aff.copy()
    maff[:3, 3] += SHIFT_MM
    keep = (slice(0, 40), slice(None), slice(None))  # partial field of view: the moving scan lacks 8 slices
    return fixed, io.Volume(mov[keep].copy(), maff), flab, io.Volume(mlab[keep].copy(), maff.copy())


def run_case(real: Path, case: dict, out_dir=None) -> dict:
    case = dict(case)
    shifted = case.pop("shifted", False)
    f, m, fl, ml = make_pair(real, shifted)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # bit-identity across machines with different core counts
    try:
        res = register(f, m, fixed_labels=fl, moving_labels=ml, fixed_modality="ct", moving_modality="ct",
                       out_dir=out_dir, **case)
    finally:
        torch.set_num_threads(threads)
    d = np.asarray(res.displacement, np.float32)
    sub = disp_subsample(d)
    wl = np.asarray(res.warped_labels)
    mof = np.asarray(res.moving_on_fixed, np.float64)
    return {"disp_sha256": _sha(res.displacement), "disp_shape": list(d.shape), "disp_sub": sub.tolist(),
            "label_counts": {str(int(k)): int((wl == k).sum()) for k in np.unique(wl) if k},
            "moving_on_fixed": {"mean": float(mof.mean()), "range": float(mof.max() - mof.min()),
                                "sub": mof[::DISP_STRIDE, ::DISP_STRIDE, ::DISP_STRIDE].round(5).tolist()},
            "summary": res.metrics["summary"],
            "field": res.metrics["field"], "registered_box": res.metrics["registered_box"],
            "dice": {str(r["label"]): r["dice"] for r in res.metrics["labels"]},
            "outputs": sorted(res.outputs)}


@pytest.fixture(scope="module")
def pins():
    if not PINS.exists():
        pytest.fail(f"{PINS} is missing; write it with `python tests/test_pipeline_pins.py`.")
    return json.loads(PINS.read_text())


def _close(got: dict, want: dict, tol: float, what: str) -> None:
    assert set(got) == set(want), (what, sorted(got), sorted(want))
    for k, w in want.items():
        g = got[k]
        if isinstance(w, (int, float)) and isinstance(g, (int, float)):
            assert abs(g - w) <= tol, f"{what}[{k}] = {g}, pinned {w} (tolerance {tol})"
        else:
            assert g == w, (what, k, g, w)


def compare_to_pin(got: dict, want: dict) -> None:
    """Assert ``got`` (:func:`run_case`) matches the pin ``want`` within the module's tolerances."""
    _close(got["summary"], want["summary"], METRIC_TOL, "summary")
    _close(got["dice"], want["dice"], METRIC_TOL, "dice")
    _close(got["field"], want["field"], FIELD_TOL, "field")
    assert got["registered_box"] == want["registered_box"]
    assert got["outputs"] == want["outputs"]
    assert got["disp_shape"] == want["disp_shape"]
    diff = np.abs(np.asarray(got["disp_sub"]) - np.asarray(want["disp_sub"]))
    assert diff.mean() <= DISP_MEAN_TOL and diff.max() <= DISP_MAX_TOL, \
        f"displacement moved: mean {diff.mean():.4f}, max {diff.max():.4f} voxel (sha {got['disp_sha256'][:12]} " \
        f"vs pinned {want['disp_sha256'][:12]})"
    assert set(got["label_counts"]) == set(want["label_counts"])
    for k, n in want["label_counts"].items():
        assert abs(got["label_counts"][k] - n) <= LABEL_COUNT_TOL * n, ("label count", k, got["label_counts"][k], n)
    gm, wm = got["moving_on_fixed"], want["moving_on_fixed"]
    img = np.abs(np.asarray(gm["sub"]) - np.asarray(wm["sub"])).mean()
    assert img <= IMAGE_TOL * wm["range"], f"moving image on the fixed grid moved by {img} (range {wm['range']})"


@pytest.mark.parametrize("name", sorted(CASES))
def test_pipeline_outputs_match_the_pins(real_dir, pins, name, tmp_path):
    if name == "dino3d":
        if not _weights_sha():
            pytest.skip("the shipped demo weights are absent")
        if _weights_sha() != pins["dino3d_weights_sha256"]:
            pytest.skip("the shipped demo weights changed since the pins were written; regenerate the dino3d pin")
    got = json.loads(json.dumps(run_case(real_dir, CASES[name], out_dir=tmp_path / name)))
    compare_to_pin(got, pins["cases"][name])


def test_the_pinned_mind_registrations_actually_register(pins):
    """The pins are of working registrations, not of a no-op: MIND raises Dice (on this small crop with few
    iterations intensity SSD and the tiny demo dino3d barely move it, which the pins record as they are)."""
    for name in ("mind", "mind_shifted"):
        c = pins["cases"][name]["summary"]
        assert c["dice"] > c["dice_initial"] + 0.02, (name, c)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from conftest import REAL

    out = {"dino3d_weights_sha256": _weights_sha(), "cases": {}}
    for n, c in CASES.items():
        out["cases"][n] = run_case(REAL, c, out_dir=Path("/tmp") / f"pins_{n}")
        print(n, out["cases"][n]["summary"])
    PINS.write_text(json.dumps(out, sort_keys=True) + "\n")  # one line: the subsamples would be 10^4 lines
    print(f"wrote {PINS}")


def test_the_registry_path_gives_the_pinned_field(real_dir, pins):
    """The method registry (what the benchmarks call) runs the same code as :func:`register`: the same field (bit
    for bit on one machine; compared here with the pins' tolerance)."""
    from dinoreg_core.pipeline import align, get_registration_method

    f, m, _, _ = make_pair(real_dir, shifted=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        disp = get_registration_method("mind").register(align(f, m, fixed_modality="ct", moving_modality="ct"),
                                                        dict(SMALL))
    finally:
        torch.set_num_threads(threads)
    diff = np.abs(disp_subsample(np.asarray(disp.numpy(), np.float32)) - np.asarray(pins["cases"]["mind"]["disp_sub"]))
    assert diff.mean() <= DISP_MEAN_TOL and diff.max() <= DISP_MAX_TOL, (diff.mean(), diff.max())
