"""Checkpoint selection by registration (dinoreg_core.ssl.select): the best logged step wins, and pretraining
scores its teacher on validation pairs, logs the Dice beside the losses and exports the best teacher."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from dinoreg_core.data.cohorts import generate_role_cohort
from dinoreg_core.errors import DinoregError
from dinoreg_core.ssl.select import ValConfig, ValLog, best_step, evaluate_snapshots
from dinoreg_core.ssl.train import load_config, train
from test_ssl_train import SMALL, _read_log


def test_best_step_picks_the_highest_logged_score():
    rows = [{"step": "10", "val_dice": "0.41"}, {"step": "20", "val_dice": ""}, {"step": "30", "val_dice": "0.52"},
            {"step": "40", "val_dice": "nan"}, {"step": "50", "val_dice": "0.52"}, {"step": "60", "val_dice": "0.30"}]
    assert best_step(rows) == 30                                   # ties: the earlier step
    assert best_step(rows[:2]) == 10
    assert best_step([{"step": 5, "x": 1.0}, {"step": 6, "x": 2.0}], key="x") == 6
    with pytest.raises(DinoregError, match="No logged row"):
        best_step([{"step": "1", "val_dice": ""}])


@pytest.fixture(scope="module")
def val_cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("val_cohort")
    return generate_role_cohort(root, "validation", 2, spacing_mm=8.0, shape=(36, 30, 34), workers=1, progress=False)


def test_pretraining_validates_by_registration_and_exports_the_best(val_cohort, tmp_path):
    d = json.loads(json.dumps(SMALL))
    d["augment"] = dict(SMALL["augment"], n_local=0)
    d.update(steps=4, log_every=1, val={"every": 2, "data": str(val_cohort), "pairs_per_task": 1},
             stream={"enabled": True, "source": "shapes", "shape": [40, 40, 40], "pool_size": 4, "new_every": 2})
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps(d))
    run = tmp_path / "run"
    train(load_config(cfg_path), "stream", run)
    val_rows = ValLog(run / "val_log.csv", start_step=None).read()
    assert [int(r["step"]) for r in val_rows] == [2, 4]
    for r in val_rows:
        assert 0.0 < float(r["val_dice"]) < 1.0 and int(r["val_pairs"]) == 3
        parts = [float(r[f"val_dice_{t}"]) for t in ("ctct", "mrmr", "mrct")]
        assert math.isclose(float(r["val_dice"]), sum(parts) / 3, rel_tol=1e-9)
    log = {int(r["step"]): r for r in _read_log(run)}
    assert log[2]["val_dice"] == val_rows[0]["val_dice"] and log[4]["val_dice"] == val_rows[1]["val_dice"]
    assert log[1]["val_dice"] == "" and log[3]["val_dice"] == ""
    best = best_step(val_rows)
    exported = load_file(run / "best_backbone.safetensors")
    snap = load_file(run / "snapshots" / f"step_{best:06d}.safetensors")
    assert exported.keys() == snap.keys() and all(torch.equal(exported[k], snap[k]) for k in snap)
    # afterwards, the same scoring over the saved snapshots: already scored steps are not redone
    assert evaluate_snapshots(run, ValConfig(data=str(val_cohort), pairs_per_task=1), progress=False) == []
