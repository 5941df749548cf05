"""Pretraining corpus builder: preprocessing, bad files, resume, readers, sources, CLI."""

from __future__ import annotations

import csv
import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from dinoreg_core import cli
from dinoreg_core.data.corpus import (CorpusConfig, CorpusDataset, build_corpus, discover_sources, load_corpus_index,
                                      load_corpus_volume)
from dinoreg_core.errors import DinoregError

REAL = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "real"
BODY_HU = 40.0
QUIET = dict(progress=False)


def _ct_phantom(shape=(40, 36, 30), spacing=(2.0, 2.0, 3.0), axes_flip=False) -> nib.Nifti1Image:
    """CT-like scan: air (-1000 HU) around a box-shaped body of soft tissue (40 HU) spanning the middle half."""
    a = np.full(shape, -1000.0, np.float32)
    sl = tuple(slice(s // 4, s // 4 + s // 2) for s in shape)
    a[sl] = BODY_HU
    aff = np.diag([*spacing, 1.0])
    if axes_flip:  # store it LPS-like (first two axes flipped) to exercise reorientation
        aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
        aff[:3, 3] = [spacing[0] * (shape[0] - 1), spacing[1] * (shape[1] - 1), 0]
    return nib.Nifti1Image(a.astype(np.int16), aff)


def _mr_phantom(shape=(32, 32, 20), seed=0) -> nib.Nifti1Image:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 5, shape).astype(np.float32)
    a[6:26, 6:26, 4:16] = rng.uniform(300, 500, (20, 20, 12))
    return nib.Nifti1Image(a, np.diag([3.0, 3.0, 4.0, 1.0]))


@pytest.fixture
def scan_folder(tmp_path) -> Path:
    d = tmp_path / "scans"
    (d / "sub").mkdir(parents=True)
    (d / "labels").mkdir()
    nib.save(_ct_phantom(), str(d / "ct_a.nii.gz"))
    nib.save(_ct_phantom(shape=(30, 30, 24), spacing=(3.0, 3.0, 2.5), axes_flip=True), str(d / "sub" / "ct_b.nii"))
    nib.save(_mr_phantom(), str(d / "sub" / "mr_c.nii.gz"))
    good = gzip.compress(_ct_phantom().to_bytes())
    (d / "broken.nii.gz").write_bytes(good[: len(good) // 3])  # truncated gzip: corrupt
    (d / "notes.txt").write_text("not an image")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.int16), np.eye(4)), str(d / "labels" / "ct_a.nii.gz"))
    return d


def test_folder_with_corrupt_and_non_nifti_files_builds_the_rest(scan_folder, tmp_path):
    out = tmp_path / "corpus"
    res = build_corpus(scan_folder, out, CorpusConfig(spacing_mm=4.0, **QUIET))
    assert (res["built"], res["cached"], res["entries"]) == (3, 0, 3)
    assert [f["source"] for f in res["failed"]] == [str(scan_folder / "broken.nii.gz")]
    assert "broken.nii.gz" in res["failed"][0]["error"] and "could not be read" in res["failed"][0]["error"]
    assert res["ignored"]["by_reason"] == {"not a NIfTI file": 1, "excluded by pattern *labels*/*": 1}

    idx = json.loads((out / "index.json").read_text())
    assert [f["source"] for f in idx["failed"]] == [str(scan_folder / "broken.nii.gz")]
    by_name = {Path(e["source"]).name: e for e in idx["entries"]}
    assert set(by_name) == {"ct_a.nii.gz", "ct_b.nii", "mr_c.nii.gz"}
    assert [by_name[n]["modality"] for n in ("ct_a.nii.gz", "ct_b.nii", "mr_c.nii.gz")] == ["ct", "ct", "mr"]
    assert all(e["modality_from"] == "guessed" and e["spacing_mm"] == [4.0] * 3 for e in idx["entries"])

    rows = list(csv.DictReader((out / "index.csv").open()))
    assert sorted(r["status"] for r in rows) == ["failed", "ok", "ok", "ok"]
    failed_row = next(r for r in rows if r["status"] == "failed")
    assert failed_row["source"].endswith("broken.nii.gz") and failed_row["error"]
    ok_a = next(r for r in rows if r["source"].endswith("ct_a.nii.gz"))
    assert [int(ok_a[f"shape_{a}"]) for a in "dhw"] == by_name["ct_a.nii.gz"]["shape"]


def test_cached_volume_is_resampled_cropped_and_normalised(scan_folder, tmp_path):
    out = tmp_path / "corpus"
    build_corpus(scan_folder, out, CorpusConfig(spacing_mm=4.0, margin_mm=4.0, **QUIET))
    e = next(e for e in load_corpus_index(out) if e.source.endswith("ct_a.nii.gz"))
    # ct_a: 40x36x30 voxels of 2x2x3 mm -> extent 78x70x87 mm -> 20x18x22 voxels at 4 mm before cropping
    assert e.original_shape == [40, 36, 30] and e.original_spacing_mm == [2.0, 2.0, 3.0]
    # body: voxels 10..29, 9..26, 7..21 of the source = 20..58, 18..52, 21..63 mm; at 4 mm with a 1-voxel margin
    # the crop keeps roughly (58-20)/4+1+2 = 11.5, 10.5, 13.5 voxels per axis
    assert all(abs(s - x) <= 1.5 for s, x in zip(e.shape, (11.5, 10.5, 13.5))), e.shape
    assert np.all(np.array(e.crop_box)[:, 0] > 0) and np.all(np.array(e.crop_box)[:, 1] < [20, 18, 22])
    vol = load_corpus_volume(e)
    assert vol.dtype == np.float32 and list(vol.shape) == e.shape
    assert 0.0 <= vol.min() and vol.max() <= 1.0
    body = (BODY_HU + 1000.0) / 2000.0  # CT window -1000..1000 HU
    centre = vol[tuple(s // 2 for s in vol.shape)]
    assert abs(centre - body) < 1e-3  # float16 storage
    assert vol[0, 0, 0] < 0.05  # the margin holds air
    raw = np.load(e.path)
    assert raw.dtype == np.float16
    mm = load_corpus_volume(e, mmap=True)
    assert isinstance(mm, np.memmap) and mm.dtype == np.float16
    # the cached grid's affine places the crop at the body: its first voxel is one margin voxel before the body
    aff = np.array(e.affine)
    assert np.allclose(np.diag(aff)[:3], [4.0, 4.0, 4.0])
    assert np.all(np.abs(aff[:3, 3] - np.array([20.0, 18.0, 21.0])) <= 8.0)


def test_lps_stored_scan_is_reoriented_and_cropped_the_same_way(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    nib.save(_ct_phantom(), str(d / "ras.nii.gz"))
    nib.save(_ct_phantom(axes_flip=True), str(d / "lps.nii.gz"))
    build_corpus(d, tmp_path / "c", CorpusConfig(spacing_mm=4.0, **QUIET))
    a, b = sorted(load_corpus_index(tmp_path / "c"), key=lambda e: Path(e.source).name)
    assert a.shape == b.shape
    np.testing.assert_allclose(load_corpus_volume(a), load_corpus_volume(b), atol=2e-3)


def test_rebuild_skips_cached_files_and_redoes_changed_ones(scan_folder, tmp_path):
    out = tmp_path / "corpus"
    cfg = CorpusConfig(spacing_mm=4.0, **QUIET)
    build_corpus(scan_folder, out, cfg)
    vols = sorted((out / "volumes").glob("*.npy"))
    mtimes = [p.stat().st_mtime_ns for p in vols]
    res = build_corpus(scan_folder, out, cfg)
    assert (res["built"], res["cached"], len(res["failed"]), res["entries"]) == (0, 3, 1, 3)
    assert [p.stat().st_mtime_ns for p in vols] == mtimes
    # a changed source is rebuilt, the others stay cached
    nib.save(_ct_phantom(shape=(44, 36, 30)), str(scan_folder / "ct_a.nii.gz"))
    res = build_corpus(scan_folder, out, cfg)
    assert (res["built"], res["cached"]) == (1, 2)
    assert next(e for e in load_corpus_index(out) if e.source.endswith("ct_a.nii.gz")).original_shape == [44, 36, 30]
    # other settings: everything is rebuilt and the old volumes are removed
    res = build_corpus(scan_folder, out, CorpusConfig(spacing_mm=5.0, dtype="float32", **QUIET))
    assert (res["built"], res["cached"], res["removed_stale"], res["entries"]) == (3, 0, 0, 3)
    assert all(np.load(e.path).dtype == np.float32 for e in load_corpus_index(out))
    assert len(list((out / "volumes").glob("*.npy"))) == 3


def test_second_source_is_added_and_stale_volumes_of_other_settings_are_removed(scan_folder, tmp_path):
    out = tmp_path / "corpus"
    other = tmp_path / "other"
    other.mkdir()
    nib.save(_mr_phantom(seed=3), str(other / "mr_x.nii.gz"))
    build_corpus(scan_folder, out, CorpusConfig(spacing_mm=4.0, **QUIET))
    res = build_corpus(other, out, CorpusConfig(spacing_mm=4.0, **QUIET))
    assert (res["built"], res["entries"]) == (1, 4)  # merged with the first source's volumes
    res = build_corpus(other, out, CorpusConfig(spacing_mm=6.0, **QUIET))
    assert (res["built"], res["entries"], res["removed_stale"]) == (1, 1, 3)
    assert len(list((out / "volumes").iterdir())) == 2  # one .npy + its sidecar


def test_nifti_format_and_dataset_reader(scan_folder, tmp_path):
    out = tmp_path / "corpus"
    build_corpus(scan_folder, out, CorpusConfig(spacing_mm=4.0, fmt="nifti", **QUIET))
    entries = load_corpus_index(out)
    assert all(e.file.endswith(".nii.gz") and e.dtype == "float32" for e in entries)
    e = entries[0]
    img = nib.load(e.path)
    assert np.allclose(img.affine, np.array(e.affine)) and list(img.shape) == e.shape
    ds = CorpusDataset(out, modality="mr")
    assert len(ds) == 1
    vol, entry = ds[0]
    assert vol.dtype == np.float32 and list(vol.shape) == entry.shape and entry.modality == "mr"
    with pytest.raises(DinoregError, match="is not a corpus"):
        load_corpus_index(tmp_path)


def test_learn2reg_dataset_json_gives_the_modality(tmp_path):
    root = tmp_path / "L2R"
    (root / "imagesTr").mkdir(parents=True)
    # a "CT" without air (min > -500 HU) would be guessed as MR; the dataset json says CT
    ct = _ct_phantom().get_fdata()
    ct[ct < -500] = -100
    nib.save(nib.Nifti1Image(ct.astype(np.int16), np.diag([2.0, 2.0, 3.0, 1.0])),
             str(root / "imagesTr" / "Toy_0001_0001.nii.gz"))
    nib.save(_mr_phantom(), str(root / "imagesTr" / "Toy_0001_0000.nii.gz"))
    (root / "Toy_dataset.json").write_text(json.dumps({
        "name": "Toy", "modality": {"0": "MR", "1": "CT"},
        "training": [{"image": "./imagesTr/Toy_0001_0000.nii.gz"}, {"image": "./imagesTr/Toy_0001_0001.nii.gz"},
                     {"image": "./imagesTr/Toy_0002_0000.nii.gz"}]}))
    items, missing, _ = discover_sources(root, CorpusConfig())  # the folder holds exactly one dataset json
    assert [(i.path.name, i.modality, i.modality_from) for i in items] == [
        ("Toy_0001_0000.nii.gz", "mr", "dataset.json"), ("Toy_0001_0001.nii.gz", "ct", "dataset.json")]
    assert len(missing) == 1 and "Toy_0002_0000.nii.gz" in missing[0]["error"]
    res = build_corpus(root / "Toy_dataset.json", tmp_path / "c", CorpusConfig(spacing_mm=4.0, **QUIET))
    assert res["entries"] == 2 and len(res["failed"]) == 1
    assert {e.modality for e in load_corpus_index(tmp_path / "c")} == {"ct", "mr"}


def test_fetched_folder_uses_its_manifest_rules(tmp_path):
    folder = tmp_path / "fetched"
    (folder / "Set" / "imagesTr").mkdir(parents=True)
    nib.save(_mr_phantom(), str(folder / "Set" / "imagesTr" / "a_0000.nii.gz"))
    nib.save(_mr_phantom(seed=1), str(folder / "Set" / "imagesTr" / "a_0001.nii.gz"))
    nib.save(_mr_phantom(seed=2), str(folder / "Set" / "unlisted.nii.gz"))
    (folder / ".dinoreg-manifest.json").write_text(json.dumps({
        "name": "set", "title": "t", "description": "d", "access": "open", "role": ["pretraining"],
        "modalities": ["mr"], "license": "x", "source": ["test"],
        "downloads": [{"url": "http://127.0.0.1/x.zip", "archive": "x.zip", "format": "zip"}],
        "layout": {"data_root": "Set", "files": [{"pattern": "Set/imagesTr/*_0000.nii.gz", "modality": "mr"},
                                                 {"pattern": "Set/imagesTr/*_0001.nii.gz", "modality": "ct"}]},
        "fetched": {"date": "today"}}))
    items, _, _ = discover_sources(folder, CorpusConfig())
    assert [(i.path.name, i.modality, i.modality_from, i.dataset) for i in items] == [
        ("a_0000.nii.gz", "mr", "manifest", "set"), ("a_0001.nii.gz", "ct", "manifest", "set")]
    forced, _, _ = discover_sources(folder, CorpusConfig(modality="mr"))
    assert {(i.modality, i.modality_from) for i in forced} == {("mr", "forced")}


def test_constant_scan_and_bad_settings_are_clear_errors(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    nib.save(nib.Nifti1Image(np.full((10, 10, 10), 7.0, np.float32), np.eye(4)), str(d / "flat.nii.gz"))
    res = build_corpus(d, tmp_path / "c", CorpusConfig(spacing_mm=2.0, **QUIET))
    assert res["entries"] == 0 and "cannot be normalised" in res["failed"][0]["error"]
    with pytest.raises(DinoregError, match="spacing"):
        build_corpus(d, tmp_path / "c", CorpusConfig(spacing_mm=0.0, **QUIET))
    with pytest.raises(DinoregError, match="does not exist"):
        build_corpus(tmp_path / "nowhere", tmp_path / "c", CorpusConfig(**QUIET))


@pytest.mark.skipif(not REAL.is_dir(), reason="real test volumes not found at ../shared/data/real")
def test_real_ct_and_mr_scans(tmp_path):
    out = tmp_path / "corpus"
    res = build_corpus(REAL, out, CorpusConfig(spacing_mm=4.0, **QUIET))
    # the two scans are kept; their label maps are left out by name, the JSON files are not NIfTI
    assert res["entries"] == 2 and res["failed"] == []
    assert res["ignored"]["by_reason"] == {"not a NIfTI file": 2, "excluded by pattern *label*.nii*": 2}
    by_name = {Path(e.source).name: e for e in load_corpus_index(out)}
    ct, mr = by_name["ct_abdomen_pelvis.nii.gz"], by_name["mr_upper_abdomen.nii.gz"]
    assert (ct.modality, mr.modality) == ("ct", "mr")
    # CT: 122x101x112 at 3 mm -> 4 mm grid of 91x76x84 before cropping to the body
    assert all(s <= m for s, m in zip(ct.shape, (91, 76, 84))) and ct.shape[2] == 84
    assert 0.2 < ct.foreground_fraction < 0.9
    v = load_corpus_volume(ct)
    assert 0 <= v.min() and v.max() <= 1 and 0.45 < float(np.median(v[v > 0.3])) < 0.6  # soft tissue ~0 to 100 HU


def test_cli_build_corpus(scan_folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["dinoreg_core.commands.data"])
    out = tmp_path / "corpus"
    rc = cli.main(["data", "build-corpus", str(scan_folder), "--out", str(out), "--spacing", "4", "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0 and "3 volumes (3 built, 0 already cached), 1 failed, 2 files ignored" in cap.out
    assert f"FAILED {scan_folder / 'broken.nii.gz'}" in cap.err
    rc = cli.main(["data", "build-corpus", str(scan_folder), "--out", str(out), "--spacing", "4", "--no-progress"])
    assert rc == 0 and "(0 built, 3 already cached)" in capsys.readouterr().out
    rc = cli.main(["data", "build-corpus", str(tmp_path / "none"), "--out", str(out), "--no-progress"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
