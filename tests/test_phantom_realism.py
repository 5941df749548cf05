"""Realism of a small synthetic cohort (6 subjects at 4 mm): overlap between subjects, organ volumes, CT Hounsfield
units per tissue and contrast phase, MR contrast families, and MR vs CT of one subject."""

from __future__ import annotations

import numpy as np
import pytest

from dinoreg_core.data import phantom_realism as R
from dinoreg_core.data.phantom import PhantomConfig, generate_subject, subject_seed

CFG = PhantomConfig(spacing_mm=4.0, shape=(96, 78, 84))  # the default field of view at 4 mm
PHASES = ("native", "arterial", "portal")
N, N_MR = 6, 4


@pytest.fixture(scope="module")
def cohort():
    out = []
    for i in range(N):
        out.append(generate_subject(subject_seed(2024, i + 1), CFG, with_mr=i < N_MR, ct_phase=PHASES[i % 3],
                                    mr_contrast=("t1", "t2")[i % 2]))
    return out


def test_dice_between_distinct_subjects_is_in_the_learn2reg_range(cohort):
    mean, per_organ, per_pair = R.intersubject_dice([s["labels"] for s in cohort])
    assert R.DICE_RANGE[0] <= mean <= R.DICE_RANGE[1], mean
    assert len(per_pair) == N * (N - 1) // 2 and min(per_pair) > 0.1
    # large organs overlap more than small ones, as in real data
    assert per_organ[6] > 0.5 and per_organ[6] > per_organ[11] > per_organ[12]
    assert max(per_organ[12], per_organ[13]) < 0.3


def test_organ_volumes_are_adult(cohort):
    for s in cohort:
        vol = R.organ_volumes_l(s["labels"], CFG.spacing_mm)
        for k, (lo, hi) in R.VOLUME_RANGES_L.items():
            assert lo <= vol[k] <= hi, (k, vol[k])
        assert 0.001 < vol[12] < 0.01 and 0.001 < vol[13] < 0.01  # adrenal glands: a few mL


def test_ct_hounsfield_units_by_tissue_and_phase(cohort):
    for s in cohort:
        ct, t, phase = s["ct"], s["tissue"], s["meta"]["ct_phase"]
        for name in ("fat", "muscle", "gas"):
            lo, hi = R.CT_RANGES_HU[name]
            assert lo <= R.tissue_mean(ct, t, name) <= hi, (name, phase)
        bone = R.tissue_mean(ct, t, ["bone_cancellous", "bone_cortical"], erode=0)
        assert R.CT_RANGES_HU["bone"][0] <= bone <= R.CT_RANGES_HU["bone"][1]
        lo, hi = R.LIVER_HU_BY_PHASE[phase]
        assert lo - 5 <= R.tissue_mean(ct, t, "liver") <= hi + 5, phase
        aorta = R.tissue_mean(ct, t, "artery", erode=1)
        cortex, medulla = R.tissue_mean(ct, t, "kidney_cortex"), R.tissue_mean(ct, t, "kidney_medulla")
        if phase == "native":
            assert 25 <= aorta <= 60 and cortex < 50
        elif phase == "arterial":
            assert aorta > 220 and cortex > 140 and cortex - medulla > 40  # corticomedullary phase
        else:
            assert 130 <= aorta <= 200 and cortex > 140
        # noise (with the liver's faint texture) in the 10-25 HU range
        assert 9.0 <= R.tissue_std(ct, t, "liver") <= 28.0


def test_mr_contrast_families(cohort):
    for s in cohort[:N_MR]:
        mr, t = s["mr"], s["mr_tissue"]
        m = {n: R.tissue_mean(mr, t, n) for n in ("fat", "liver", "spleen", "muscle", "urine", "bile", "csf")}
        if s["meta"]["mr_contrast"] == "t1":
            assert m["fat"] > m["liver"] > m["spleen"] > m["muscle"] and m["urine"] < m["muscle"] * 1.2
        else:
            assert min(m["urine"], m["bile"]) > m["fat"] > m["spleen"] > m["liver"] > m["muscle"]
        outside = mr[s["mr_mask"] == 0]
        assert outside.min() >= 0.0 and 5.0 < outside.mean() < 80.0  # Rician noise floor, no negative values


def test_mr_is_not_an_intensity_mapped_ct(cohort):
    for s in cohort[:N_MR]:
        rho = R.mr_ct_rank_correlation(s["ct"], s["tissue"], s["mr"], s["mr_tissue"])
        assert abs(rho) < 0.5, (s["meta"]["mr_contrast"], rho)


def test_mr_shows_the_same_anatomy_in_another_breathing_state_and_pose(cohort):
    inter = R.intersubject_dice([s["labels"] for s in cohort])[0]
    for s in cohort[:N_MR]:
        meta = s["meta"]
        assert abs(meta["mr_breath_mm"] - meta["ct_breath_mm"]) >= CFG.mr_breath_change_mm[0] - 1e-6
        shift = np.linalg.norm(R.centroid_mm(s["labels"], 6, 4.0) - R.centroid_mm(s["mr_labels"], 6, 4.0))
        assert shift > 3.0
        d = R.organ_dice(s["labels"], s["mr_labels"])
        assert 0.5 < d[6] < 0.97  # same liver, moved
        v_ct, v_mr = R.organ_volumes_l(s["labels"], 4.0), R.organ_volumes_l(s["mr_labels"], 4.0)
        assert abs(v_ct[6] - v_mr[6]) / v_ct[6] < 0.15  # same organ size
        assert float(np.nanmean(list(d.values()))) > inter  # closer to its own CT than subjects are to each other
