"""Evaluation sharded over processes: 2 processes (torchrun, CPU) give the same table as one; resumable per pair."""

from __future__ import annotations

import json
import os
import subprocess
import time
import sys

import numpy as np
import pandas as pd
import pytest

from dinoreg_core.errors import DinoregError
from dinoreg_core.evaluation import shard
from dinoreg_core.evaluation.runner import PairSpec

from synthetic_images import sphere_pair

METRIC_COLUMNS = ["dataset", "pair", "method", "label", "label_name", "dice", "hd95_mm", "hd95_vox", "sdlogj",
                  "sdlogj_l2r", "folding_pct", "settings"]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("pairs")
    return [sphere_pair(d, s, shape=(28, 24, 26), n_labels=2, radius=5.0, centre_range=(8, 16), max_disp=2.0)
            for s in range(1, 6)]


def _spec(pairs, out):
    return shard.EvalSpec(pairs=pairs, methods=["intensity"], dataset="blobs", label_names={1: "a", 2: "b"},
                          method_settings={"intensity": {"grid_sp": 4}}, out_dir=str(out))


def test_shard_indices_cover_pairs_once():
    got = sorted(i for r in range(3) for i in shard.shard_indices(8, r, 3))
    assert got == list(range(8))
    assert shard.shard_indices(2, 2, 3) == []


def test_spec_round_trip_and_hash(pairs, tmp_path):
    s = _spec(pairs, tmp_path / "a")
    s2 = shard.EvalSpec.from_dict(json.loads(json.dumps(s.to_dict())))
    assert s2.hash() == s.hash() and s2.pairs[0].fixed == pairs[0].fixed and s2.label_names == {1: "a", 2: "b"}
    assert _spec(pairs, tmp_path / "b").hash() == s.hash()  # the output folder is not part of the hash
    assert _spec(pairs[:2], tmp_path / "a").hash() != s.hash()


def test_two_processes_match_one(pairs, tmp_path):
    one = shard.run_evaluation(_spec(pairs, tmp_path / "one"), processes=1, progress=False)
    two = shard.run_evaluation(_spec(pairs, tmp_path / "two"), processes=2, progress=False)
    h = _spec(pairs, tmp_path).hash()
    assert (tmp_path / "two" / "shards" / h / "rank-0-of-2.csv").exists()
    assert (tmp_path / "two" / "shards" / h / "rank-1-of-2.csv").exists()
    assert list(one["pair"].unique()) == [p.name for p in pairs] == list(two["pair"].unique())
    pd.testing.assert_frame_equal(one[METRIC_COLUMNS], two[METRIC_COLUMNS], check_exact=False, rtol=1e-5)
    assert np.isfinite(one.loc[one.method == "intensity", "dice"]).all()


def test_env_ranks_and_resume(pairs, tmp_path, monkeypatch):
    """Ranks from RANK/WORLD_SIZE, files only (no process group); a rerun skips finished pairs."""
    spec = _spec(pairs[:3], tmp_path / "env")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec.to_dict()))
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "1", "OMP_NUM_THREADS": "1"}
    r1 = subprocess.run([sys.executable, "-m", "dinoreg_core.evaluation.shard", str(path), "--no-progress"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert r1.returncode == 0, r1.stderr
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    df = shard.evaluate_sharded(spec, progress=False)
    assert list(df["pair"].unique()) == ["p1", "p2", "p3"]
    # rerun: every pair has its part file, so nothing is evaluated again
    import dinoreg_core.evaluation.shard as mod

    monkeypatch.setattr(mod, "evaluate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-evaluated")))
    again = shard.evaluate_sharded(spec, progress=False)
    pd.testing.assert_frame_equal(df[METRIC_COLUMNS], again[METRIC_COLUMNS])


def test_failed_rank_is_one_sentence(pairs, tmp_path):
    bad = PairSpec("bad", tmp_path / "missing.nii.gz", pairs[0].moving)
    spec = _spec([pairs[0], bad], tmp_path / "fail")
    with pytest.raises(DinoregError, match="missing.nii.gz"):
        shard.run_shard(spec, 1, 2, progress=False)
    with pytest.raises(DinoregError, match=r"Evaluation rank 1 of 2 failed: .*missing\.nii\.gz"):
        shard.merge_shards(spec, 2, timeout_s=5, poll_s=0.1)
    with pytest.raises(DinoregError, match="RANK=3"):
        os.environ["RANK"], os.environ["WORLD_SIZE"] = "3", "2"
        try:
            shard.world_from_env()
        finally:
            del os.environ["RANK"], os.environ["WORLD_SIZE"]


def test_hash_follows_weight_files(pairs, tmp_path):
    """Weights retrained at the same path give another hash, so old per-pair rows are not reused."""
    w = tmp_path / "w.safetensors"
    w.write_bytes(b"old")
    spec = _spec(pairs, tmp_path / "o")
    spec.method_settings = {"intensity": {"feat.weights": str(w)}}
    h1 = spec.hash()
    time.sleep(0.01)
    w.write_bytes(b"newer")
    assert spec.hash() != h1
