"""Pretraining data: sources (NIfTI folder, corpus, Learn2Reg json), the sample stream and the rank sampler."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from dinoreg_core.data.augment import AugmentConfig
from dinoreg_core.errors import DinoregError
from dinoreg_core.ssl.data import MaskConfig, PretrainViews, StepBatchSampler, VolumeSource, collate_views


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("src")
    (out / "imagesTr").mkdir()
    (out / "labelsTr").mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        img = rng.uniform(-1000, 400, (20, 18, 16)).astype(np.float32)
        nib.save(nib.Nifti1Image(img, np.diag([2.0, 2.0, 2.0, 1.0])), str(out / "imagesTr" / f"T_{i:04d}_0000.nii.gz"))
        nib.save(nib.Nifti1Image((img > 0).astype(np.int16), np.diag([2.0, 2.0, 2.0, 1.0])),
                 str(out / "labelsTr" / f"T_{i:04d}_0000.nii.gz"))
    return out


def test_nifti_folder_source_leaves_out_labels_and_normalises(folder):
    src = VolumeSource(folder, spacing_mm=2.0)
    assert len(src) == 3 and all("imagesTr" in src.name(i) for i in range(3))
    v = src.load(0)
    assert v.dtype == np.float32 and v.ndim == 3 and v.min() >= 0.0 and v.max() <= 1.0
    assert src.describe()["kind"] == "scans"


def test_learn2reg_json_and_corpus_sources(folder, tmp_path):
    ds = {"name": "T", "modality": {"0": "CT"},
          "training": [{"image": f"./imagesTr/T_{i:04d}_0000.nii.gz"} for i in (0, 2)]}
    (folder / "T_dataset.json").write_text(json.dumps(ds))
    try:
        src = VolumeSource(folder / "T_dataset.json")
        assert len(src) == 2 and src.name(1).endswith("T_0002_0000.nii.gz")
        from dinoreg_core.data.corpus import CorpusConfig, build_corpus

        build_corpus(folder, tmp_path / "corpus", CorpusConfig(spacing_mm=4.0, progress=False))
    finally:
        (folder / "T_dataset.json").unlink()
    corpus = VolumeSource(tmp_path / "corpus")
    assert corpus.kind == "corpus" and len(corpus) == 2
    v = corpus.load(0)
    assert v.dtype == np.float32 and 0.0 <= v.min() and v.max() <= 1.0
    with pytest.raises(DinoregError, match="holds no usable volume"):
        (tmp_path / "empty").mkdir()
        VolumeSource(tmp_path / "empty")


def test_sample_stream_is_a_pure_function_of_seed_and_index(folder):
    aug = AugmentConfig(global_size=8, local_size=4, n_local=1)
    a = PretrainViews(VolumeSource(folder), aug, MaskConfig(probability=1.0), patch_size=4, seed=3)
    b = PretrainViews(VolumeSource(folder), aug, MaskConfig(probability=1.0), patch_size=4, seed=3, cache_size=0)
    for i in (7, 0, 5):                             # any order, any instance
        x, y = a[i], b[i]
        assert all(torch.equal(x[k], y[k]) for k in ("teacher_global", "student_global", "student_flips", "masks"))
    assert x["masks"].shape == (2, 8) and x["masks"].any()
    # every volume once per epoch, a new order in the next epoch
    assert sorted(a.volume_index(i) for i in range(3)) == [0, 1, 2]
    orders = {tuple(a.volume_index(e * 3 + i) for i in range(3)) for e in range(6)}
    assert len(orders) > 1
    c = PretrainViews(VolumeSource(folder), aug, MaskConfig(), patch_size=4, seed=4)
    assert not torch.equal(c[7]["teacher_global"], a[7]["teacher_global"])


def test_rank_sampler_splits_the_global_batch_and_resumes_at_an_offset():
    one = list(StepBatchSampler(0, 3, 4))
    two = [list(StepBatchSampler(0, 3, 4, rank=r, world_size=2)) for r in range(2)]
    assert one == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert [a + b for a, b in zip(*two)] == one
    # resumed at step 2 after 8 samples: the same indices as the uninterrupted stream
    assert list(StepBatchSampler(2, 3, 4, sample_offset=8)) == one[2:]
    with pytest.raises(DinoregError):
        StepBatchSampler(0, 1, 3, rank=0, world_size=2)


def test_collate_is_view_major():
    s = [{"teacher_global": torch.full((2, 1, 1, 1, 1), float(i)), "student_global": torch.zeros(2, 1, 1, 1, 1),
          "student_flips": torch.zeros(2, 3, dtype=torch.bool), "masks": torch.zeros(2, 1, dtype=torch.bool),
          "global_boxes": torch.stack([torch.full((2, 3), 10.0 * i + v) for v in range(2)]),
          "local": torch.zeros(0, 1, 1, 1, 1), "volume": i} for i in range(3)]
    out = collate_views(s)
    # rows v*B + b: view 0 of samples 0,1,2 then view 1 of samples 0,1,2
    assert out["teacher_global"].flatten().tolist() == [0, 1, 2, 0, 1, 2]
    assert out["global_boxes"].shape == (6, 2, 3)
    assert out["global_boxes"][:, 0, 0].tolist() == [0, 10, 20, 1, 11, 21]   # the box travels with its view
    assert out["local"].shape == (0, 1, 1, 1, 1) and out["volumes"].tolist() == [0, 1, 2]


def test_partners_are_found_by_case_and_resampled_onto_the_scan_grid(tmp_path):
    """A CT and an "MR" of case 1 on different grids of the same world box: the MR comes back on the CT's grid,
    voxel for voxel where the CT's box lies inside it; case 2 has no partner."""
    (tmp_path / "imagesTr").mkdir()
    z, y, x = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (24, 20, 16)], indexing="ij")
    ct = (-1000.0 + 60.0 * z + 20.0 * y + 5.0 * x).astype(np.float32)            # HU, a world-linear ramp
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(ct, aff), str(tmp_path / "imagesTr" / "T_0001_0000.nii.gz"))
    mr = 10.0 + (z + y + x)                                                         # MR-like positive values
    mr_aff = aff.copy()
    mr_aff[:3, 3] = [-4.0, 0.0, 0.0]                                                # 2 voxels further along D
    mr_big = np.zeros((26, 20, 16), np.float32)
    mr_big[2:] = mr
    nib.save(nib.Nifti1Image(mr_big, mr_aff), str(tmp_path / "imagesTr" / "T_0001_0001.nii.gz"))
    nib.save(nib.Nifti1Image(ct, aff), str(tmp_path / "imagesTr" / "T_0002_0000.nii.gz"))
    src = VolumeSource(tmp_path, spacing_mm=2.0)
    src.corpus_cfg.crop_foreground = False
    names = [Path(src.name(i)).name for i in range(len(src))]
    i_ct, i_mr, i_other = (names.index(n) for n in ("T_0001_0000.nii.gz", "T_0001_0001.nii.gz", "T_0002_0000.nii.gz"))
    assert src.partners(i_ct) == [i_mr] and src.partners(i_mr) == [i_ct] and src.partners(i_other) == []
    on_ct = src.load_partner(i_ct, i_mr)
    ref = src.load(i_mr)                                                            # the MR on its own grid
    assert on_ct.shape == src.load(i_ct).shape
    np.testing.assert_allclose(on_ct, ref[2:], atol=1e-5)                           # shifted by the 2 voxels
    # the views of a paired sample: the student shows the other modality when partner_prob is 1
    no_aug = dict(bias_field_prob=0.0, gamma_prob=0.0, contrast_prob=0.0, noise_prob=0.0, blur_prob=0.0,
                  gin_prob=0.0, flip_prob=0.0)
    cfg = AugmentConfig(global_size=8, local_size=4, n_local=1, partner_prob=1.0, **no_aug)
    ds = PretrainViews(src, cfg, MaskConfig(), patch_size=4, seed=0)
    swapped = 0
    for k in range(6):
        s = ds[k]
        for t, st in zip(s["teacher_global"], s["student_global"]):
            assert not torch.equal(t, st) or ds.volume_index(k) == i_other
            swapped += int(not torch.equal(t, st))
    assert swapped > 0
    cfg0 = AugmentConfig(global_size=8, local_size=4, n_local=1, partner_prob=0.0, **no_aug)
    s0 = PretrainViews(src, cfg0, MaskConfig(), patch_size=4, seed=0)[0]
    assert torch.equal(s0["teacher_global"], s0["student_global"])
