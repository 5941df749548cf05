"""`dinoreg reproduce` on the smallest profile: notebooks 01-04 run through papermill and write finite CSV/PNG
outputs; a run killed mid-way and a failing step keep the finished steps; a rerun skips finished steps; a changed
parameter reruns only its step and those after it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinoreg_core import reproduce
from dinoreg_core.cli import main as cli_main
from dinoreg_core.errors import DinoregError

TINY = {
    "name": "tiny",
    "description": "smallest parameters (tests)",
    "common": {"dataset": "synthetic", "n_subjects": 3, "n_val_subjects": 2, "cohort_seed": 0, "spacing_mm": 8.0,
               "shape": [40, 32, 36], "workers": 1, "device": "cpu"},
    "steps": {
        "01_pretrain_3d_dino": {"train": "train", "corpus_subjects": 2, "corpus_spacing_mm": 8.0,
                                "corpus_shape": [40, 32, 36], "corpus_workers": 1, "steps": 2,
                                "overrides": {"batch_size": 2, "augment.n_local": 2, "log_every": 1}},
        "02_feature_maps": {"methods": ["dino3d", "mind"]},
        "03_evaluate_registration": {"tasks": ["ctct", "mrct"], "pairs_per_task": 2,
                                     "methods": ["intensity", "mind", "dino3d"],
                                     "method_settings": {"mind": {"grid_sp": 4}}},
        "04_paper_figures": {},
    },
}
STEPS = list(reproduce.STEPS)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("reproduce")
    prof = d / "tiny.json"
    prof.write_text(json.dumps(TINY))
    return prof, d / "out"


def _statuses(summary):
    return [s["status"] for s in summary["steps"]]


def _png_ok(p: Path):
    import matplotlib.image as mpimg

    a = mpimg.imread(str(p))
    assert a.ndim == 3 and a.shape[0] > 50 and a.shape[1] > 50 and np.isfinite(a).all() and a.std() > 0


def test_killed_failing_resumed_skipped(tiny, monkeypatch):
    prof, out = tiny
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run = out / "runs" / "tiny"
    rec = lambda s: run / "steps" / f"{s}.json"

    # 1. killed while notebook 02 runs: notebook 01's step is recorded and kept
    p = subprocess.Popen([sys.executable, "-m", "dinoreg_core.cli", "reproduce", "--profile", str(prof), "--out",
                          str(out), "--no-progress"], start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    t0 = time.time()
    while not (run / "02_feature_maps.running.ipynb").exists():
        assert p.poll() is None and time.time() - t0 < 300, "reproduce ended before step 02 started"
        time.sleep(0.2)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert rec(STEPS[0]).exists() and not rec(STEPS[1]).exists()
    t01 = json.loads(rec(STEPS[0]).read_text())["finished"]

    # 2. rerun with a step that fails: 01 skipped, 02 runs, 03 stops the run with one sentence naming the notebook
    with pytest.raises(DinoregError) as e:
        reproduce.reproduce(str(prof), out=out, sets=['03.methods=["nope"]'], progress=False)
    msg = str(e.value)
    assert "03_evaluate_registration.ipynb" in msg and "None of the methods nope" in msg and "\n" not in msg
    assert json.loads(rec(STEPS[0]).read_text())["finished"] == t01
    assert rec(STEPS[1]).exists() and not rec(STEPS[2]).exists()
    assert (run / "03_evaluate_registration.failed.ipynb").exists()

    # 3. fixed: only 03 and 04 run; every output exists and holds finite numbers
    s = reproduce.reproduce(str(prof), out=out, progress=False)
    assert _statuses(s) == ["skipped", "skipped", "ran", "ran"]
    figs, tabs = out / "figures" / "tiny", out / "tables" / "tiny"
    for name in ("pretrain_loss_curves.png", "feature_maps.png", "method_comparison_dice.png", "qualitative_panel.png"):
        _png_ok(figs / name)
    ev = pd.read_csv(tabs / "evaluation.csv")
    assert set(ev["method"]) == {"initial", "intensity", "mind", "dino3d"}
    assert set(ev["dataset"]) == {"SynthAbdomen CT-CT", "SynthAbdomen MR-CT"}
    reg = ev[ev.method != "initial"]
    assert np.isfinite(reg[["sdlogj", "folding_pct", "runtime_s", "peak_rss_mb"]].to_numpy()).all()
    assert np.isfinite(reg["dice"]).mean() > 0.5 and (reg["dice"].dropna().between(0, 1)).all()
    res = pd.read_csv(tabs / "results.csv")
    assert np.isfinite(res["dice_mean"]).all() and len(res) == 8
    assert np.isfinite(res.loc[res.method == "mind", "dice_diff_vs_ref"]).all()
    organ = pd.read_csv(tabs / "per_organ.csv")
    assert np.isfinite(organ["dino3d_mean"]).any() and "±" in (tabs / "per_organ.md").read_text()
    assert json.loads((tabs / "parameters.json").read_text())["steps"]["01_pretrain_3d_dino"]["steps"] == 2
    log = pd.read_csv(run / "pretrain" / "log.csv")
    assert len(log) == 2 and np.isfinite(log["loss"]).all()
    for st in STEPS:
        assert (run / f"{st}.ipynb").exists()

    # 4. nothing changed: every step is skipped
    t = time.perf_counter()
    s = reproduce.reproduce(str(prof), out=out, progress=False)
    assert _statuses(s) == ["skipped"] * 4 and time.perf_counter() - t < 30

    # 5. a parameter of notebook 04 changed: only 04 reruns
    s = reproduce.reproduce(str(prof), out=out, sets=['04.metric="hd95_mm"', "qualitative=false"], progress=False)
    assert _statuses(s) == ["skipped", "skipped", "skipped", "ran"]
    _png_ok(figs / "method_comparison_hd95_mm.png")


def test_cli_errors_are_one_sentence(tiny, capsys):
    prof, out = tiny
    assert cli_main(["reproduce", "--profile", "nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dinoreg: error: There is no reproduce profile named 'nope'") and "\n" not in err
    bad = json.loads(prof.read_text())
    bad["steps"]["02_feature_maps"]["colour"] = "red"
    badp = prof.with_name("bad.json")
    badp.write_text(json.dumps(bad))
    assert cli_main(["reproduce", "--profile", str(badp), "--out", str(out / "bad")]) == 2
    assert "sets 'colour' for 02_feature_maps.ipynb, which has no such parameter" in capsys.readouterr().err
    assert not (out / "bad" / "runs").exists()
    assert cli_main(["reproduce", "--profile", str(prof), "--out", str(out), "--set", "nosuchparam=1"]) == 2
    assert "names no parameter of any notebook" in capsys.readouterr().err
