"""Cohorts by role (dinoreg_core.data.cohorts): disjoint seeds and pairs per role, the Learn2Reg layout with
inter-patient CT-CT, MR-MR and MR-CT pairs, and the held-back appearance in the evaluation cohort."""

import json

import nibabel as nib
import numpy as np
import pytest

from dinoreg_core.data.cohorts import (COHORT_ROLES, ROLE_SEEDS, generate_role_cohort, inter_patient_pairs,
                                       load_pairs, role_config, role_subject_seeds)
from dinoreg_core.errors import DinoregError
from dinoreg_core.ssl.data import StreamConfig


def test_no_subject_seed_of_one_role_appears_in_another():
    seeds = {role: set(role_subject_seeds(role, 20_000 if role == "pretrain" else 200)) for role in ROLE_SEEDS}
    assert len(seeds["pretrain"]) == 20_000 and all(len(seeds[r]) == 200 for r in COHORT_ROLES)
    roles = list(seeds)
    for i, a in enumerate(roles):
        for b in roles[i + 1:]:
            assert not seeds[a] & seeds[b], (a, b)
    assert StreamConfig().seed == ROLE_SEEDS["pretrain"]               # pretraining streams the pretrain role
    assert len(set(ROLE_SEEDS.values())) == len(ROLE_SEEDS)


def test_no_pair_of_one_role_appears_in_another():
    """A pair is identified by the subject seeds and modalities of its two images."""
    def pair_ids(role):
        cfg = role_config(role, 12)
        seeds = role_subject_seeds(role, 12)
        ids = set()
        for kind, entries in inter_patient_pairs(cfg.task, 12, held_back=role == "evaluation").items():
            for e in entries:
                f, m = (e[k].rsplit("/", 1)[1].removesuffix(".nii.gz").split("_")[1:] for k in ("fixed", "moving"))
                ids.add((seeds[int(f[0]) - 1], f[1], seeds[int(m[0]) - 1], m[1]))
        return ids

    ids = {r: pair_ids(r) for r in COHORT_ROLES}
    assert all(len(v) >= 12 * 3 for v in ids.values())
    for i, a in enumerate(COHORT_ROLES):
        for b in COHORT_ROLES[i + 1:]:
            assert not ids[a] & ids[b]


def test_pairs_are_inter_patient_and_cover_the_three_tasks():
    pairs = inter_patient_pairs("T", 10)
    assert set(pairs) == {"registration_ctct", "registration_mrmr", "registration_mrct"}
    for kind, entries in pairs.items():
        assert len(entries) == 10
        for e in entries:
            fc, mc = (int(e[k].split("_")[1]) for k in ("fixed", "moving"))
            assert fc != mc
    e = pairs["registration_mrct"][0]
    assert e["fixed"].endswith("_0001_0000.nii.gz") and e["moving"].endswith("_0002_0001.nii.gz")
    held = inter_patient_pairs("T", 10, held_back=True)["registration_mrct_heldout"][0]
    assert held["moving"].endswith("_0002_0002.nii.gz") and held["moving_label"].endswith("_0002_0001.nii.gz")
    with pytest.raises(DinoregError):
        role_config("pretrain")
    with pytest.raises(DinoregError):
        generate_role_cohort("unused", "evaluation", 2, seed=3)


def test_evaluation_cohort_is_written_with_the_held_back_appearance(tmp_path):
    root = tmp_path / "eval"
    js = generate_role_cohort(root, "evaluation", 2, spacing_mm=8.0, shape=(36, 30, 34), workers=1, progress=False)
    d = json.loads(js.read_text())
    assert d["role"] == "evaluation" and d["held_back_appearance"] == "pd"
    assert "registration_val" not in d
    pairs = load_pairs(js, ("ctct", "mrmr", "mrct", "mrmr_heldout", "mrct_heldout"))
    assert len(pairs) == 5
    for p in pairs:
        for k in ("fixed", "moving", "fixed_label", "moving_label"):
            assert (root / p[k]).exists(), p[k]
    mr = nib.load(str(root / "imagesTr" / "SynthEvaluation_0001_0001.nii.gz")).get_fdata()
    pd = nib.load(str(root / "imagesTr" / "SynthEvaluation_0001_0002.nii.gz")).get_fdata()
    lab = nib.load(str(root / "labelsTr" / "SynthEvaluation_0001_0001.nii.gz")).get_fdata()
    assert mr.shape == pd.shape == lab.shape
    assert not np.allclose(mr, pd)
    # the held-back image shows the MR's anatomy: the body (labels > 0 lie inside it) is brighter than air
    assert pd[lab > 0].mean() > 3 * pd[pd < np.percentile(pd, 5) + 1].mean() + 1
    assert generate_role_cohort(root, "evaluation", 2, spacing_mm=8.0, shape=(36, 30, 34), workers=1,
                                progress=False) == js                      # complete: returned at once


def test_data_cohort_cli_writes_the_role_cohort_and_refuses_bad_values(tmp_path, capsys):
    """`dinoreg data cohort` gives the same volumes as generate_role_cohort (the seed is the role's);
    an unknown role, one subject or a bad spacing is one sentence and exit status 2."""
    from dinoreg_core.cli import main

    small = ["--spacing", "8", "--shape", "30", "26", "28", "--no-progress"]
    assert main(["data", "cohort", "--role", "validation", "--out", str(tmp_path / "cli"), "--n-subjects", "2",
                 *small]) == 0
    ref = generate_role_cohort(tmp_path / "ref", "validation", 2, spacing_mm=8.0, shape=(30, 26, 28), progress=False)
    d = json.loads((tmp_path / "cli" / "SynthValidation_dataset.json").read_text())
    r = json.loads(ref.read_text())
    assert d["role"] == r["role"] == "validation"
    assert d["registration_mrct"] == r["registration_mrct"] and d["registration_ctct"] == r["registration_ctct"]
    for name in ("SynthValidation_0001_0000.nii.gz", "SynthValidation_0002_0001.nii.gz"):
        a = nib.load(tmp_path / "cli" / "imagesTr" / name).get_fdata()
        b = nib.load(tmp_path / "ref" / "imagesTr" / name).get_fdata()
        assert np.array_equal(a, b)
    capsys.readouterr()
    for bad in (["--role", "pretrain"], ["--role", "tuning", "--n-subjects", "1"],
                ["--role", "tuning", "--spacing", "-2"]):
        assert main(["data", "cohort", "--out", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "Traceback" not in err and err
    assert not (tmp_path / "bad").exists()
