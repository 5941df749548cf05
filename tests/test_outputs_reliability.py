"""Reliability behaviours that succeed (the failing ones are in test_faults.py): a reused output folder holds the
new set as a whole, leftovers of a killed run are swept, metrics.json is strict JSON, --fresh removes only its own
run's folders, pretraining keeps two checkpoints and falls back to the previous one, a damaged scan is skipped."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from dinoreg_core.cli import main
from dinoreg_core.errors import DinoregError
from dinoreg_core.outputs import MANIFEST, read_manifest, verify
from fault_cases import FAST, make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("rel"))


def _strict(text: str):
    def refuse(c):
        raise ValueError(f"non-strict JSON constant {c}")
    return json.loads(text, parse_constant=refuse)


def _register(ws, out, *extra):
    return main(["-q", "register", str(ws / "in/fixed.nii.gz"), str(ws / "in/moving.nii.gz"), "--out", str(out),
                 *FAST, *extra])


def test_reused_folder_holds_the_new_set_as_a_whole(ws, capsys):
    out = ws / "reuse"
    shutil.copytree(ws / "prev", out)  # an earlier set with warped_labels.nii.gz
    (out / "my_notes.txt").write_text("mine")
    (out / ".disp-abcd1234.nii.gz").write_bytes(b"partial")  # what a kill -9 mid-write leaves
    (out / ".dinoreg-staging-xyz").mkdir()
    (out / ".dinoreg-staging-xyz" / "warped.nii.gz").write_bytes(b"partial")
    assert "warped_labels.nii.gz" in read_manifest(out)["files"]
    assert _register(ws, out) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["config.json", "disp.nii.gz", "metrics.json", "my_notes.txt", MANIFEST, "warped.nii.gz"]
    assert verify(out) is None
    assert set(read_manifest(out)["files"]) == {"config.json", "disp.nii.gz", "metrics.json", "warped.nii.gz"}
    (out / "warped.nii.gz").write_bytes(b"changed")
    assert "checksum" in verify(out)


def test_metrics_json_is_strict_json_with_null_for_undefined_values(ws, tmp_path):
    (tmp_path / "map.json").write_text('{"1": 7, "2": 8}')  # moving ids onto fixed ids the fixed labels lack
    out = tmp_path / "o"
    assert _register(ws, out, "--fixed-labels", str(ws / "in/flab.nii.gz"), "--moving-labels",
                     str(ws / "in/mlab.nii.gz"), "--label-map", str(tmp_path / "map.json")) == 0
    text = (out / "metrics.json").read_text()
    m = _strict(text)  # json.loads would accept NaN; this refuses it
    assert m["metrics"]["summary"]["dice"] is None and "NaN" not in text
    assert m["metrics"]["field"]["sdlogj"] > 0


def test_fresh_removes_only_this_runs_folders(tmp_path):
    from dinoreg_core.reproduce import clean_run

    out = tmp_path / "results"
    for sub in ("runs", "figures", "tables"):
        (out / sub / "r1").mkdir(parents=True)
        (out / sub / "r2").mkdir(parents=True)
    for sub in ("runs", "tables"):
        (out / sub / "r1" / "parameters.json").write_text(json.dumps({"run_id": "r1"}))
    (out / "figures" / "r1" / "a.png").write_bytes(b"png")
    gone = clean_run(out, "r1")
    assert sorted(p.parent.name for p in gone) == ["figures", "runs", "tables"]
    assert not any((out / s / "r1").exists() for s in ("runs", "figures", "tables"))
    assert all((out / s / "r2").is_dir() for s in ("runs", "figures", "tables"))
    with pytest.raises(DinoregError, match="did not write it"):
        clean_run(out, "r2")  # no parameters.json of run r2: refused, nothing removed
    assert all((out / s / "r2").is_dir() for s in ("runs", "figures", "tables"))
    for bad in ("..", ".", "../x", "a/b", ""):
        with pytest.raises(DinoregError, match="run id"):
            clean_run(out, bad)


def test_two_checkpoints_and_fallback_to_the_previous_one(tmp_path, capsys):
    from dinoreg_core.ssl import checkpoints as ck

    def state(step):
        return {"step": step, "samples": 2 * step, "config": {"head_out_dim": 64}, "student": {"w": torch.ones(2) * step},
                "teacher": {}, "dino_center": {}, "ibot_center": {}, "optimizer": {}, "scaler": {}, "rng": []}

    ck.save(state(1), tmp_path)
    ck.save(state(2), tmp_path)
    assert torch.load(tmp_path / ck.PREVIOUS, weights_only=True)["step"] == 1
    got, path = ck.load_verified(tmp_path)
    assert got["step"] == 2 and path.name == ck.NAME
    (tmp_path / ck.NAME).write_bytes((tmp_path / ck.NAME).read_bytes()[:300])  # damaged after it was written
    got, path = ck.load_verified(tmp_path)
    assert got["step"] == 1 and path.name == ck.PREVIOUS and torch.equal(got["student"]["w"], torch.ones(2))
    assert "damaged or truncated" in capsys.readouterr().err
    with pytest.raises(DinoregError, match="cannot change head_out_dim"):
        ck.check_config(got["config"], {"head_out_dim": 128}, path)
    (tmp_path / ck.PREVIOUS).write_bytes(b"junk")
    with pytest.raises(DinoregError, match="no earlier good checkpoint"):
        ck.load_verified(tmp_path)


def test_a_damaged_scan_is_skipped_the_same_way_every_time(ws, tmp_path, capsys):
    from dinoreg_core.data.augment import AugmentConfig
    from dinoreg_core.ssl.data import MaskConfig, PretrainViews, VolumeSource

    d = tmp_path / "scans"
    d.mkdir()
    shutil.copy(ws / "in/fixed.nii.gz", d / "a.nii.gz")
    shutil.copy(ws / "in/truncated.nii.gz", d / "b.nii.gz")
    shutil.copy(ws / "in/moving.nii.gz", d / "c.nii.gz")
    aug = AugmentConfig(global_size=16, local_size=8, n_local=1, region_size=24)
    views = [PretrainViews(VolumeSource(d, spacing_mm=2.0), aug, MaskConfig(), 4, seed=0) for _ in range(2)]
    got = [[views[k][i]["volume"] for i in range(6)] for k in range(2)]
    assert got[0] == got[1]  # a pure function of (seed, index), damaged scan or not
    bad = [i for i, n in enumerate(views[0].source.names) if n.endswith("b.nii.gz")][0]
    assert bad not in got[0] and set(views[0].skipped) == {bad}
    err = capsys.readouterr().err
    assert "skipped the damaged scan" in err and "b.nii.gz" in err


def test_sigterm_while_writing_removes_the_partial_files(ws, tmp_path):
    """SIGTERM once writing has begun (a staging folder exists): exit 143, no staging folder or temp file left, the
    earlier complete set still complete."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from fault_cases import REPO

    out = tmp_path / "term"
    shutil.copytree(ws / "prev", out)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    p = subprocess.Popen([sys.executable, "-m", "dinoreg_core.cli", "register", str(ws / "in/fixed.nii.gz"),
                          str(ws / "in/moving.nii.gz"), "--out", str(out), *FAST], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while p.poll() is None and not any(q.name.startswith(".dinoreg-staging-") for q in out.iterdir()):
        assert time.time() - t0 < 300
        time.sleep(0.001)
    p.send_signal(signal.SIGTERM)
    err = p.communicate(timeout=120)[1]
    if p.returncode == 0:  # it finished between the check and the signal: a complete new set
        assert verify(out) is None
        return
    assert p.returncode == 143 and "terminated" in err and "Traceback" not in err
    assert not [q.name for q in out.iterdir() if q.name.startswith(".")]
    assert verify(out) is None
