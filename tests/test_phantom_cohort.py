"""The cohort writer: Learn2Reg layout and dataset.json, readable by the project's loaders, deterministic,
idempotent, resumable, and safe against mixing two configurations in one folder."""

from __future__ import annotations

import json
import os
import time

import nibabel as nib
import numpy as np
import pytest

from dinoreg_core.data.phantom import PhantomConfig, generate_cohort, generate_subject, subject_seed
from dinoreg_core.errors import DinoregError
from dinoreg_core.io import load_labels, load_volume, read_l2r_dataset

TINY = PhantomConfig(n_subjects=3, spacing_mm=8.0, shape=(48, 39, 42), seed=5, mr_subjects=(1, 3),
                     n_val_subjects=3, workers=1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    return root, generate_cohort(root, TINY, progress=False)


def test_layout_and_dataset_json(cohort):
    root, jp = cohort
    assert jp == root / "SynthAbdomen_dataset.json"
    names = sorted(p.name for p in (root / "imagesTr").glob("*.nii.gz"))
    assert names == ["SynthAbdomen_0001_0000.nii.gz", "SynthAbdomen_0001_0001.nii.gz", "SynthAbdomen_0002_0000.nii.gz",
                     "SynthAbdomen_0003_0000.nii.gz", "SynthAbdomen_0003_0001.nii.gz"]
    for d in ("labelsTr", "masksTr"):
        assert sorted(p.name for p in (root / d).glob("*.nii.gz")) == names
    meta = json.loads(jp.read_text())
    assert meta["name"] == "SynthAbdomen" and meta["modality"] == {"0": "CT", "1": "MR"}
    assert meta["labels"]["0"] == "background" and meta["labels"]["1"] == "spleen" and meta["labels"]["13"] == \
        "left adrenal gland" and len(meta["labels"]) == 14
    assert meta["tensorImageShape"] == {"0": [48, 39, 42]} and meta["numTraining"] == 5
    assert meta["generator"]["seed"] == 5 and meta["generator"]["config"]["shape"] == [48, 39, 42]
    assert meta["registration_val"] == [
        {"fixed": f"./imagesTr/SynthAbdomen_000{a}_0000.nii.gz", "moving": f"./imagesTr/SynthAbdomen_000{b}_0000.nii.gz"}
        for a, b in ((1, 2), (1, 3), (2, 3))]
    assert meta["registration_mrct"] == [
        {"fixed": f"./imagesTr/SynthAbdomen_000{c}_0000.nii.gz", "moving": f"./imagesTr/SynthAbdomen_000{c}_0001.nii.gz"}
        for c in (1, 3)]
    assert [s["mr_contrast"] for s in meta["subjects"] if "mr_contrast" in s] == ["t1", "t2"]
    assert not (root / ".phantom_progress.json").exists()


def test_read_by_the_project_loaders_in_ras_with_the_generated_content(cohort):
    root, jp = cohort
    ds = read_l2r_dataset(root)
    assert ds.name == "SynthAbdomen" and len(ds.labels) == 13
    assert len(ds.pairs["registration_val"]) == 3 and len(ds.pairs["registration_mrct"]) == 2
    pair = ds.pairs["registration_mrct"][1]
    assert pair.fixed_labels is not None and pair.moving_mask is not None and pair.name == "0003_0003"
    ct = load_volume(pair.fixed)
    mr = load_volume(pair.moving)
    lab = load_labels(pair.moving_labels)
    assert nib.aff2axcodes(ct.affine) == ("R", "A", "S") and ct.spacing == (8.0, 8.0, 8.0)
    assert np.allclose(ct.affine, mr.affine) and ct.shape == (48, 39, 42)
    s = generate_subject(subject_seed(5, 3), TINY, mr_contrast="t2")
    assert np.array_equal(ct.array, np.clip(np.rint(s["ct"]), -1024, 3071))
    assert np.array_equal(mr.array, np.rint(s["mr"]))
    assert np.array_equal(lab.array, s["mr_labels"])
    mask = load_labels(pair.fixed_mask)
    assert np.array_equal(mask.array, s["mask"])


def test_second_call_returns_at_once_without_rewriting(cohort):
    root, jp = cohort
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")}
    t = time.perf_counter()
    assert generate_cohort(root, TINY, progress=False) == jp
    assert time.perf_counter() - t < 1.0
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*.nii.gz")} == stamps


def test_another_config_in_the_same_folder_is_refused(cohort):
    root, _ = cohort
    other = PhantomConfig(**{**TINY.__dict__, "seed": 6})
    with pytest.raises(DinoregError, match="another configuration"):
        generate_cohort(root, other, progress=False)


def test_interrupted_cohort_resumes_with_identical_files(tmp_path):
    cfg = PhantomConfig(**{**TINY.__dict__, "n_subjects": 2, "mr_subjects": (2,), "n_val_subjects": 2})
    jp = generate_cohort(tmp_path, cfg, progress=False)
    mr_path = tmp_path / "imagesTr" / "SynthAbdomen_0002_0001.nii.gz"
    ct_path = tmp_path / "imagesTr" / "SynthAbdomen_0001_0000.nii.gz"
    want = load_volume(mr_path).array
    ct_stamp = ct_path.stat().st_mtime_ns
    # simulate a crash: the json and one file missing, a progress marker left behind
    jp.unlink()
    mr_path.unlink()
    (tmp_path / ".phantom_progress.json").write_text(json.dumps({"config": cfg.as_dict()}))
    assert generate_cohort(tmp_path, cfg, progress=False) == jp
    assert np.array_equal(load_volume(mr_path).array, want)
    assert ct_path.stat().st_mtime_ns == ct_stamp  # the complete case was kept
    # a partial cohort of another configuration is refused
    jp.unlink()
    (tmp_path / ".phantom_progress.json").write_text(json.dumps({"config": {"seed": 99}}))
    with pytest.raises(DinoregError, match="part of a cohort"):
        generate_cohort(tmp_path, cfg, progress=False)


def test_parallel_workers_write_the_same_cohort(tmp_path):
    cfg = PhantomConfig(**{**TINY.__dict__, "n_subjects": 2, "mr_subjects": (1,), "n_val_subjects": 2,
                           "spacing_mm": 12.0, "shape": (32, 26, 28)})
    a = generate_cohort(tmp_path / "one", cfg, progress=False)
    b = generate_cohort(tmp_path / "two", PhantomConfig(**{**cfg.__dict__, "workers": 2}), progress=False)
    assert json.loads(a.read_text()) == json.loads(b.read_text())  # workers is not part of the cohort's identity
    for rel in ("imagesTr/SynthAbdomen_0001_0001.nii.gz", "labelsTr/SynthAbdomen_0002_0000.nii.gz"):
        assert np.array_equal(np.asanyarray(nib.load(a.parent / rel).dataobj),
                              np.asanyarray(nib.load(b.parent / rel).dataobj))


def test_unwritable_output_is_one_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DinoregError, match="cannot be created"):
        generate_cohort(blocker / "cohort", TINY, progress=False)
    if os.name == "posix" and os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        with pytest.raises(DinoregError):
            generate_cohort(ro / "c", TINY, progress=False)
