"""The synthetic cohort through `dinoreg data`: the manifest agrees with the generator; fetch and
generate-phantoms write a valid Learn2Reg-layout cohort that the corpus builder reads with the right modalities."""

from __future__ import annotations

import json
from itertools import combinations

import nibabel as nib
import pytest

from dinoreg_core import cli
from dinoreg_core.commands.data import phantom_config
from dinoreg_core.data.corpus import CorpusConfig, build_corpus, load_corpus_index
from dinoreg_core.data.manifests import get_manifest
from dinoreg_core.errors import DinoregError

phantom = pytest.importorskip("dinoreg_core.data.phantom", reason="the phantom generator is not available")

TINY = {"n_subjects": 2, "spacing_mm": 12.0, "shape": [32, 26, 28], "seed": 3, "task": "SynthAbdomen",
        "workers": 1}


@pytest.fixture
def data_cli(monkeypatch):
    monkeypatch.setattr(cli, "SUBCOMMANDS", ["dinoreg_core.commands.data"])
    return cli.main


def test_builtin_synthetic_manifest_matches_the_generator_config():
    m = get_manifest("synthetic")
    assert m.access == "generated" and m.generator.function == "generate_cohort"
    cfg = phantom_config(m.generator.config)
    n_mr = len(cfg.mr_cases())
    counts = {r.pattern: r.count for r in m.layout.files}
    assert counts[f"imagesTr/{cfg.task}_*_0000.nii.gz"] == cfg.n_subjects
    assert counts[f"imagesTr/{cfg.task}_*_0001.nii.gz"] == n_mr
    assert counts[f"labelsTr/{cfg.task}_*.nii.gz"] == cfg.n_subjects + n_mr
    assert m.layout.dataset_json == f"{cfg.task}_dataset.json"
    assert m.pairs == {"registration_val": len(list(combinations(range(cfg.n_val_subjects), 2))),
                       "registration_mrct": n_mr}
    assert m.image_shape == tuple(cfg.shape) and m.spacing_mm == (cfg.spacing_mm,) * 3
    assert m.labels == dict(phantom.LABELS)


def test_phantom_config_errors_name_the_field():
    with pytest.raises(DinoregError, match="PhantomConfig has no field 'n_subject'"):
        phantom_config({"n_subject": 3})
    assert phantom_config({"spacing": 4.0, "shape": [16, 16, 16]}).shape == (16, 16, 16)
    # a range given as one number, or a number given as text, is refused naming the field (not a traceback later)
    with pytest.raises(DinoregError, match=r"mr_breath_change_mm=0 must be a list"):
        phantom_config({"mr_breath_change_mm": 0})
    with pytest.raises(DinoregError, match=r"mr_pose_mm='none' must be a number"):
        phantom_config({"mr_pose_mm": "none"})
    assert phantom_config({"mr_breath_change_mm": [0, 0], "mr_pose_mm": 0}).mr_breath_change_mm == (0, 0)


def test_fetch_generated_cohort_from_a_manifest_and_build_a_corpus(tmp_path, data_cli, capsys):
    m = get_manifest("synthetic").to_dict()
    m["generator"]["config"] = TINY
    m["image_shape"], m["spacing_mm"] = TINY["shape"], [12.0] * 3
    for rule in m["layout"]["files"]:
        rule["count"] = {"SynthAbdomen_dataset.json": 1, "imagesTr/SynthAbdomen_*_0000.nii.gz": 2,
                         "imagesTr/SynthAbdomen_*_0001.nii.gz": 1}.get(rule["pattern"], 3)
    m["pairs"] = {"registration_val": 1, "registration_mrct": 1}
    mpath = tmp_path / "tiny_synthetic.json"
    mpath.write_text(json.dumps(m))
    dest = tmp_path / "data"
    assert data_cli(["data", "fetch", str(mpath), "--dest", str(dest), "--no-progress"]) == 0
    folder = dest / "synthetic"
    assert f"generated 'synthetic' into {folder}" in capsys.readouterr().out
    marker = json.loads((folder / ".dinoreg-manifest.json").read_text())
    assert marker["generated"]["config"]["n_subjects"] == 2
    assert sorted(p.name for p in dest.iterdir()) == ["synthetic"]  # no temporary folder left
    img = nib.load(str(folder / "imagesTr" / "SynthAbdomen_0001_0000.nii.gz"))
    assert img.shape == (32, 26, 28) and nib.aff2axcodes(img.affine) == ("R", "A", "S")
    # the fetched folder feeds the corpus builder with the manifest's modalities
    res = build_corpus(folder, tmp_path / "corpus", CorpusConfig(spacing_mm=12.0, progress=False))
    assert res["entries"] == 3 and res["failed"] == []
    mods = sorted((e.source.rsplit("_", 1)[-1], e.modality, e.modality_from) for e in load_corpus_index(tmp_path / "corpus"))
    assert mods == [("0000.nii.gz", "ct", "manifest")] * 2 + [("0001.nii.gz", "mr", "manifest")]
    # fetching again finds it in place
    assert data_cli(["data", "fetch", str(mpath), "--dest", str(dest), "--no-progress"]) == 0


def test_generate_phantoms_keeps_the_field_of_view_when_the_spacing_changes(tmp_path, data_cli, capsys):
    out = tmp_path / "cohort"
    rc = data_cli(["data", "generate-phantoms", "--out", str(out), "--n-subjects", "1", "--spacing", "12",
                   "--seed", "5", "--workers", "1", "--set", "mr_fraction=0", "--no-progress"])
    assert rc == 0
    d = phantom.PhantomConfig()
    want = [round(s * d.spacing_mm / 12.0) for s in d.shape]
    assert f"generated 1 subjects ({'x'.join(map(str, want))} voxels at 12 mm)" in capsys.readouterr().out
    ds = json.loads((out / "SynthAbdomen_dataset.json").read_text())
    assert ds["generator"]["config"]["spacing_mm"] == 12.0 and ds["generator"]["config"]["seed"] == 5
    assert nib.load(str(out / "imagesTr" / "SynthAbdomen_0001_0000.nii.gz")).shape == tuple(want)
    rc = data_cli(["data", "generate-phantoms", "--out", str(tmp_path / "x"), "--set", "bogus=1"])
    assert rc == 2 and "PhantomConfig has no field 'bogus'" in capsys.readouterr().err
