"""`dinoreg l2r`: a complete, resumable Learn2Reg submission folder with the official file names and metrics."""

from __future__ import annotations

import json
import zipfile

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from dinoreg_core import io
from dinoreg_core.api import register
from dinoreg_core.cli import main
from dinoreg_core.data.phantom import PhantomConfig, generate_cohort

pytest.importorskip("surface_distance", reason="surface-distance (HD95) is not installed")

TINY = PhantomConfig(n_subjects=2, spacing_mm=8.0, shape=(48, 39, 42), seed=11, mr_subjects=(1,), n_val_subjects=2,
                     workers=1)
FAST = ["--set", "grid_sp=4", "--set", "disp_hw=2", "--set", "iterations=20"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("l2r")
    jp = generate_cohort(root / "data", TINY, progress=False)
    d = json.loads(jp.read_text())
    d["registration_test"] = [{"fixed": "./imagesTr/SynthAbdomen_0001_0000.nii.gz",
                               "moving": "./imagesTr/SynthAbdomen_0002_0000.nii.gz"},
                              {"fixed": "./imagesTr/SynthAbdomen_0001_0001.nii.gz",  # MR <- CT: the long name
                               "moving": "./imagesTr/SynthAbdomen_0002_0000.nii.gz"}]
    jp.write_text(json.dumps(d))
    return root, jp


def test_submission_folder_names_zip_table_and_resume(cohort, capsys):
    root, jp = cohort
    sub = root / "sub"
    assert main(["l2r", str(jp), "--split", "registration_test", "--out", str(sub), "--init", "com", *FAST]) == 0
    names = ["disp_0001_0002.nii.gz", "disp_0001_0001_0002_0000.nii.gz"]
    for n in names:
        f = nib.load(str(sub / n))
        assert f.shape == (48, 39, 42, 3) and f.get_data_dtype() == np.float32
    with zipfile.ZipFile(sub / "submission.zip") as z:
        assert sorted(z.namelist()) == sorted(names)
    table = pd.read_csv(sub / "metrics_l2r.csv")
    assert list(table["file"]) == names and table["dice"].between(0, 1).all()
    # the table's Dice is the evaluation's: map_coordinates(moving labels, identity + field, order=0)
    field = np.asarray(nib.load(str(sub / names[0])).dataobj, np.float64)
    fl = np.asarray(nib.load(str(root / "data/labelsTr/SynthAbdomen_0001_0000.nii.gz")).dataobj)
    ml = np.asarray(nib.load(str(root / "data/labelsTr/SynthAbdomen_0002_0000.nii.gz")).dataobj)
    ident = np.stack(np.meshgrid(*[np.arange(s) for s in fl.shape], indexing="ij"))
    wl = ndimage.map_coordinates(ml, ident + np.moveaxis(field, -1, 0), order=0)
    dice = []
    for lab in range(1, 14):
        if (fl == lab).any() and (ml == lab).any():
            dice.append(2 * ((fl == lab) & (wl == lab)).sum() / ((fl == lab).sum() + (wl == lab).sum()))
    assert table["dice"][0] == pytest.approx(np.mean(dice), abs=1e-12)
    # and the pair's metrics.json carries the same number
    m = json.loads((sub / "pairs" / "0001_0000-0002_0000" / "metrics.json").read_text())["metrics"]["learn2reg"]
    assert m["dice"] == pytest.approx(table["dice"][0], abs=1e-12)
    # resumable: a second run registers nothing and leaves the files as they are
    mtimes = [(sub / n).stat().st_mtime_ns for n in names]
    capsys.readouterr()
    assert main(["l2r", str(jp), "--split", "registration_test", "--out", str(sub), *FAST]) == 0
    out = capsys.readouterr().out
    assert "2/2 pairs" in out and "(2 already there)" in out
    assert [(sub / n).stat().st_mtime_ns for n in names] == mtimes


def test_sharded_runs_split_the_pairs(cohort, monkeypatch):
    root, jp = cohort
    sub = root / "sharded"
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert main(["l2r", str(jp), "--split", "registration_test", "--out", str(sub), *FAST]) == 0
    assert sorted(p.name for p in sub.glob("disp_*")) == ["disp_0001_0001_0002_0000.nii.gz"]
    assert not (sub / "submission.zip").exists()  # rank 1 leaves the zip and table to rank 0


def test_no_l2r_file_when_the_grids_differ(tmp_path):
    rng = np.random.default_rng(0)
    a = ndimage.gaussian_filter(rng.normal(size=(24, 22, 20)), 2).astype(np.float32)
    b = a[:22, :20, :18].copy()
    fa, fb = tmp_path / "T_0001_0000.nii.gz", tmp_path / "T_0002_0000.nii.gz"
    nib.save(nib.Nifti1Image(a, np.diag([2.0, 2, 2, 1])), str(fa))
    nib.save(nib.Nifti1Image(b, np.diag([2.0, 2, 2, 1])), str(fb))
    res = register(fa, fb, out_dir=tmp_path / "out", grid_sp=4, disp_hw=2, iterations=10)
    note = res.metrics["learn2reg"]["note"]
    assert res.metrics["learn2reg"]["file"] is None and "different grids" in note
    assert not list((tmp_path / "out").glob("disp_0001*"))
    with pytest.raises(io.DinoregError, match="different grids"):
        io.l2r_whole_field(res.displacement, io.load_volume(fa), io.load_volume(fb), None)
