"""The `authors` pretraining config holds the published facts of the seed paper's recipe, and its DINO loss (one
global view, a second unmasked student pass) runs."""

import json
import math
from pathlib import Path

import pytest

from dinoreg_core.errors import DinoregError
from dinoreg_core.ssl.train import load_config, train
from test_ssl_train import SMALL, _read_log

AUTHORS = Path(__file__).resolve().parents[1] / "dinoreg_core" / "configs" / "pretrain_authors.json"


def test_authors_config_holds_the_published_facts():
    c = load_config(AUTHORS)
    a, s = c.augment, c.stream
    assert (a.n_global, a.n_local, a.global_size) == (1, 0, 128)              # one 128^3 view, no local views
    assert s.spacing_range_mm == (1.0, 2.0) and a.max_aspect == 1.0           # random isotropic 1-2 mm
    assert (c.batch_size, c.lr) == (4, 1e-3)
    assert c.ibot_separate_head and c.head_out_dim == 8192                    # separate heads, 8192 prototypes
    assert c.koleo_weight == 0.1 and (c.centering, c.center_momentum) == ("center", 0.9)
    assert (c.teacher_temp_start, c.teacher_temp_end) == (0.04, 0.07)
    assert math.isclose(c.teacher_temp_warmup_steps / c.steps, 1000 / 3000, rel_tol=1e-3)   # 1000 of 3000 epochs
    assert (c.momentum_start, c.momentum_end) == (0.992, 0.998)
    assert (c.mask_ratio_min, c.mask_ratio_max) == (0.4, 0.7)
    assert s.second_appearance_prob == 0.0 and a.flip_prob > 0 and a.gin_prob > 0   # clean teacher, GIN student
    assert c.dino_unmasked_pass and c.dino_weight == 1.0 and c.ibot_weight == 1.0
    assert c.model == "paper" and c.model_config().patch_size == 4


def test_one_view_needs_the_unmasked_pass_and_the_pass_gives_a_dino_loss(tmp_path):
    d = json.loads(json.dumps(SMALL))
    d["augment"] = dict(SMALL["augment"], n_global=1, n_local=0)
    d.update(steps=2, mask_probability=1.0,
             stream={"enabled": True, "source": "shapes", "shape": [40, 40, 40], "pool_size": 4, "new_every": 2,
                     "appearances": {"ct": 1.0, "mr": 1.0}, "second_appearance_prob": 0.0})
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(d))
    with pytest.raises(DinoregError, match="dino_unmasked_pass"):
        load_config(p)
    train(load_config(p, ["dino_unmasked_pass=true"]), "stream", tmp_path / "run")
    rows = _read_log(tmp_path / "run")
    assert len(rows) == 2
    for r in rows:
        assert 0.0 < float(r["dino_loss"]) < 20.0 and 0.0 < float(r["ibot_loss"]) < 20.0
