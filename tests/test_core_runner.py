"""The methods x pairs runner returns one tidy row per (dataset, pair, method, label)."""

from __future__ import annotations

from dinoreg_core.evaluation.runner import evaluate, summarise

from synthetic_images import sphere_pair


def test_runner_tidy_table(tmp_path):
    pairs = [sphere_pair(tmp_path, 1), sphere_pair(tmp_path, 2)]
    df = evaluate(pairs, ["intensity", "mind"], dataset="blobs", method_settings={"mind": {"grid_sp": 4}},
                  progress=False)
    assert set(df["method"]) == {"initial", "intensity", "mind"}
    assert len(df) == 2 * 3 * 3  # pairs x (initial + 2 methods) x labels
    for col in ["dataset", "pair", "label", "dice", "hd95_mm", "sdlogj", "folding_pct", "runtime_s", "peak_rss_mb"]:
        assert col in df.columns
    s = summarise(df).set_index("method")
    assert s.loc["mind", "dice_mean"] > s.loc["initial", "dice_mean"]
    assert (df.loc[df.method == "mind", "settings"] == "grid_sp=4").all()
