"""Pins the registration pipeline's outputs bit for bit, so a refactor of the stages shows it changed nothing.

The pair: a 48x56x48 crop of the real CT (../shared/data/real) warped by a known smooth random field, and the same
moving scan shifted 6 mm in world space and cut to a partial field of view (so the resampling onto the fixed grid and
the covered-box crop are exercised). Each case's displacement, warped labels and Dice are compared with the values the
code produced when the pins were written (``tests/data/pipeline_pins.json``): the displacement by SHA-256 of its
float32 bytes, the metrics exactly.

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
    return {"disp_sha256": _sha(res.displacement), "warped_labels_sha256": _sha(res.warped_labels),
            "moving_on_fixed_sha256": _sha(res.moving_on_fixed), "summary": res.metrics["summary"],
            "field": res.metrics["field"], "registered_box": res.metrics["registered_box"],
            "dice": {str(r["label"]): r["dice"] for r in res.metrics["labels"]},
            "outputs": sorted(res.outputs)}


@pytest.fixture(scope="module")
def pins():
    if not PINS.exists():
        pytest.fail(f"{PINS} is missing; write it with `python tests/test_pipeline_pins.py`.")
    return json.loads(PINS.read_text())


@pytest.mark.parametrize("name", sorted(CASES))
def test_pipeline_outputs_are_bit_identical_to_the_pins(real_dir, pins, name, tmp_path):
    if name == "dino3d":
        if not _weights_sha():
            pytest.skip("the shipped demo weights are absent")
        if _weights_sha() != pins["dino3d_weights_sha256"]:
            pytest.skip("the shipped demo weights changed since the pins were written; regenerate the dino3d pin")
    got = json.loads(json.dumps(run_case(real_dir, CASES[name], out_dir=tmp_path / name)))
    want = pins["cases"][name]
    assert got["summary"] == want["summary"]
    assert got["dice"] == want["dice"]
    assert got["field"] == want["field"]
    assert got["registered_box"] == want["registered_box"]
    assert got["disp_sha256"] == want["disp_sha256"]
    assert got["warped_labels_sha256"] == want["warped_labels_sha256"]
    assert got["moving_on_fixed_sha256"] == want["moving_on_fixed_sha256"]
    assert got["outputs"] == want["outputs"]


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
    PINS.write_text(json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"wrote {PINS}")


def test_the_registry_path_gives_the_pinned_field(real_dir, pins):
    """The method registry (what the benchmarks call) runs the same code as :func:`register`: same field bits."""
    from dinoreg_core.pipeline import align, get_registration_method

    f, m, _, _ = make_pair(real_dir, shifted=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        disp = get_registration_method("mind").register(align(f, m, fixed_modality="ct", moving_modality="ct"),
                                                        dict(SMALL))
    finally:
        torch.set_num_threads(threads)
    assert _sha(disp.numpy()) == pins["cases"]["mind"]["disp_sha256"]
