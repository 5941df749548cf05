"""The notebook helpers (dinoreg_core.evaluation.suite): datasets, task pairs, method availability, hand-over files."""

from __future__ import annotations

import pytest

from dinoreg_core.errors import DinoregError
from dinoreg_core.evaluation import suite


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    jp = suite.prepare_dataset("synthetic", run, n_subjects=3, n_val_subjects=2, seed=0, spacing_mm=8.0,
                               shape=(40, 32, 36), workers=1, progress=False)
    return run, jp


def test_synthetic_tasks(cohort):
    run, jp = cohort
    assert jp.parent == run / "data" / "synthetic_seed0" and jp.exists()
    # a second call reuses the complete cohort
    assert suite.prepare_dataset("synthetic", run, n_subjects=3, n_val_subjects=2, seed=0, spacing_mm=8.0,
                                 shape=(40, 32, 36), workers=1, progress=False) == jp
    ct, names, label = suite.task_pairs(jp, "ctct")
    assert label == "SynthAbdomen CT-CT" and len(ct) == 1 and names[6] == "liver"
    assert (ct[0].fixed_modality, ct[0].moving_modality) == ("ct", "ct")
    mr, _, label = suite.task_pairs(jp, "mrct", limit=1)
    assert label == "SynthAbdomen MR-CT" and len(mr) == 1
    assert (mr[0].fixed_modality, mr[0].moving_modality) == ("ct", "mr") and mr[0].moving_labels.exists()
    tasks = suite.evaluation_tasks(["ctct", "mrct"], dataset=str(jp.parent), run_dir=run, pairs_per_task=1)
    assert list(suite.tasks_table(tasks)["pairs"]) == [1, 1]
    path, mod = suite.dataset_scan(None, str(jp.parent), 1, run)
    assert mod in ("ct", "mr") and path.exists()


def test_dataset_and_task_errors(tmp_path, cohort):
    with pytest.raises(DinoregError, match="Unknown task 'ctmr'"):
        suite.task_pairs(cohort[1], "ctmr")
    with pytest.raises(DinoregError, match="dinoreg data fetch l2r_abdomen_ctct --dest"):
        suite.prepare_dataset("l2r_abdomen_ctct", tmp_path, data_dir=str(tmp_path / "data"))
    with pytest.raises(DinoregError, match="no dataset manifest named 'nope'"):
        suite.prepare_dataset("nope", tmp_path)
    with pytest.raises(DinoregError, match="run notebook 01"):
        suite.read_handoff(tmp_path, "01_pretrain_3d_dino", producer="notebook 01")
    with pytest.raises(DinoregError, match="train must be"):
        suite.pretrain_or_shipped("maybe", None, tmp_path)


def test_method_status_and_settings(tmp_path, caplog):
    st = suite.method_status(["intensity", "mind", "dino3d", "nope"], {"dino3d": {"feat.weights": str(tmp_path / "w")}})
    assert st["intensity"] is None and st["mind"] is None
    assert "does not exist" in st["dino3d"] and "Unknown registration method 'nope'" in st["nope"]
    assert "Unknown mind feature option 'weights'" in suite.method_status(["mind"], {"mind": {"feat.weights": "w"}})["mind"]
    ok = suite.usable_methods(["mind", "nope"])
    assert ok == ["mind"] and "left out nope" in caplog.text
    with pytest.raises(DinoregError, match="None of the methods nope"):
        suite.usable_methods(["nope"], verbose=False)
    s = suite.with_weights({"mind": {"grid_sp": 4}}, dino3d="w.safetensors")
    assert s == {"mind": {"grid_sp": 4}, "dino3d": {"feat.weights": "w.safetensors"}}
    assert suite.feature_options(s) == {"mind": {}, "dino3d": {"weights": "w.safetensors"}}
    suite.write_handoff(tmp_path, "01_pretrain_3d_dino", {"weights": "x.safetensors"})
    assert suite.dino3d_weights(None, tmp_path) == "x.safetensors"
    assert suite.dino3d_weights("y", tmp_path) == "y"


def test_paired_synthetic_cohort_has_a_coregistered_mr_per_subject(tmp_path):
    """The pretraining corpus of notebook 01: every subject has an MR whose anatomy lies where the CT's does."""
    import nibabel as nib
    import numpy as np

    from dinoreg_core.ssl.data import VolumeSource

    jp = suite.prepare_dataset("synthetic", tmp_path, n_subjects=2, n_val_subjects=0, seed=3, spacing_mm=8.0,
                               shape=(40, 32, 36), workers=1, progress=False, paired=True)
    assert jp.parent == tmp_path / "data" / "synthetic_seed3_paired"
    labels = sorted((jp.parent / "labelsTr").glob("*.nii.gz"))
    assert len(labels) == 4                                           # CT and MR of each subject
    for case in ("0001", "0002"):
        ct = np.asarray(nib.load(str(jp.parent / "labelsTr" / f"SynthAbdomen_{case}_0000.nii.gz")).dataobj)
        mr = np.asarray(nib.load(str(jp.parent / "labelsTr" / f"SynthAbdomen_{case}_0001.nii.gz")).dataobj)
        organ = (ct > 0) | (mr > 0)
        assert (ct[organ] == mr[organ]).mean() > 0.85                 # the same anatomy, voxel for voxel
    src = VolumeSource(jp.parent, spacing_mm=8.0)
    assert all(len(src.partners(i)) == 1 for i in range(len(src)))
