"""dinoreg tune and the evaluation protocol: tuning never touches evaluation pairs (roles, seeds, refusals), the
search is resumable and writes a preset that loads, the protocol writes its tables and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dinoreg_core.cli import main
from dinoreg_core.data.cohorts import ROLE_SEEDS, generate_role_cohort, role_subject_seeds
from dinoreg_core.errors import DinoregError
from dinoreg_core.evaluation.protocol import ProtocolConfig, run_protocol
from dinoreg_core.evaluation.tune import TuneConfig, tune, tuning_pairs
from dinoreg_core.pipeline.presets import load_preset

TINY = dict(spacing_mm=8.0, shape=(30, 26, 28), workers=1, progress=False)
FAST = {"grid_sp": 4, "disp_hw": 2, "iterations": 5}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohorts")
    return {"tuning": generate_role_cohort(root / "tuning", "tuning", 2, **TINY),
            "evaluation": generate_role_cohort(root / "evaluation", "evaluation", 2, **TINY)}


def test_tuning_never_touches_evaluation_pairs(cohorts, tmp_path):
    assert ROLE_SEEDS["tuning"] != ROLE_SEEDS["evaluation"]
    assert not set(role_subject_seeds("tuning", 500)) & set(role_subject_seeds("evaluation", 500))
    assert not set(role_subject_seeds("tuning", 500)) & set(role_subject_seeds("pretrain", 2000))
    tun = tuning_pairs(cohorts["tuning"], ("ctct", "mrmr", "mrct"), 2)
    ev = json.loads(cohorts["evaluation"].read_text())
    ev_files = {e[k] for kind in ("ctct", "mrmr", "mrct") for e in ev[f"registration_{kind}"] for k in ("fixed", "moving")}
    assert all("SynthTuning" in p["fixed"] and "SynthTuning" in p["moving"] for p in tun)
    assert not {p[k].split("/")[-1] for p in tun for k in ("fixed", "moving")} & {f.split("/")[-1] for f in ev_files}
    with pytest.raises(DinoregError, match="role 'evaluation'"):
        tuning_pairs(cohorts["evaluation"], ("ctct",), 1)
    with pytest.raises(DinoregError, match="role 'evaluation'"):
        tune(cohorts["evaluation"], tmp_path / "p.json", TuneConfig(method="intensity"), progress=False)
    with pytest.raises(DinoregError, match="role 'tuning'"):
        run_protocol(tmp_path / "proto", ProtocolConfig(methods=("mind",), presets=("official",),
                                                        cohort=str(cohorts["tuning"])), progress=False)


def test_tune_resumes_and_writes_a_preset_that_loads(cohorts, tmp_path):
    out = tmp_path / "intensity_tuned.json"
    cfg = TuneConfig(method="intensity", params=("lambda_weight",), factors=(0.25,), tasks=("ctct",),
                     fixed_settings=dict(FAST), max_sdlogj=10.0, max_folding_pct=100.0)
    first = tune(cohorts["tuning"], out, cfg, progress=False)
    log = (tmp_path / "intensity_tuned.log.jsonl").read_text().splitlines()
    assert len(log) == 2                                          # the official start and lambda x 0.25
    recs = [json.loads(line) for line in log]
    best = max(recs, key=lambda r: r["dice"])
    assert first["objective"]["dice"] == pytest.approx(max(recs[0]["dice"], best["dice"]))
    again = tune(cohorts["tuning"], out, cfg, progress=False)      # replayed from the log, nothing scored again
    assert (tmp_path / "intensity_tuned.log.jsonl").read_text().splitlines() == log
    assert again["settings"] == first["settings"]
    assert "iterations" not in first["settings"]                  # the held settings are not part of the preset
    assert load_preset("intensity", str(out)).settings == first["settings"]
    assert first["spacing_mm"] == TINY["spacing_mm"]               # the grid the voxel-counted settings were found on


def test_installing_a_tuned_preset_keeps_its_spacing(tmp_path, monkeypatch):
    from dinoreg_core.pipeline import presets

    monkeypatch.setattr(presets, "PRESET_DIR", tmp_path)
    p = presets.write_preset_file(tmp_path / "t.json", "mind", {"disp_hw": 2}, source="test",
                                  extra={"spacing_mm": 2.0})
    weights_json = tmp_path / "w.json"
    weights_json.write_text(json.dumps({"arch": "test"}))
    presets.install_preset(p, name="tuned_2mm", weights_json=weights_json)
    assert presets.package_presets("mind")["presets"]["tuned_2mm"]["spacing_mm"] == 2.0
    assert json.loads(weights_json.read_text())[presets.WEIGHTS_KEY]["tuned_2mm"]["spacing_mm"] == 2.0


def test_tune_cli_refuses_bad_input(cohorts, tmp_path, capsys):
    base = ["tune", "--data", str(cohorts["tuning"]), "--out", str(tmp_path / "x.json")]
    for extra, word in ((["--method", "intensity", "--params", "nosuch"], "nosuch"),
                        (["--method", "intensity", "--factors", "0,2"], "factors"),
                        (["--method", "ants"], "peer"),
                        (["--method", "intensity", "--pairs", "0"], "pairs")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert word in err and "Traceback" not in err


def test_protocol_writes_tables_and_resumes(cohorts, tmp_path):
    cfg = ProtocolConfig(methods=("intensity", "mind"), presets=("official",), tasks=("ctct", "mrct"),
                         pairs_per_task=1, cohort=str(cohorts["evaluation"]), hd95=False,
                         method_settings={"intensity": FAST, "mind": FAST})
    files = run_protocol(tmp_path / "p", cfg, progress=False)
    rows = pd.read_csv(tmp_path / "p" / "rows.csv")
    assert set(rows["method"]) == {"intensity[official]", "mind[official]"}
    assert set(rows["task"]) == {"ctct", "mrct"}
    res = pd.read_csv(files["results"]["csv"])
    assert {"initial", "mind[official]", "intensity[official]"} <= set(res["method"])
    assert (res["pairs"] == 1).all()
    run_protocol(tmp_path / "p", cfg, progress=False)             # resumed: nothing registered again
    assert len(pd.read_csv(tmp_path / "p" / "rows.csv")) == len(rows)
    organ = pd.read_csv(files["per_organ"]["csv"])
    assert "mind[official]_mean" in organ.columns and organ["label_name"].str.len().min() > 1
    summ = pd.read_csv(files["summary"]["csv"]).set_index("row")     # the wide table: the same numbers
    r = res[res["method"] == "intensity[official]"].iloc[0]
    assert summ.loc["intensity[official]", r["dataset"]].startswith(f"{r['dice_mean']:.3f} (1), {r['dice_diff_vs_ref']:+.3f}")
    assert summ.loc["mind[official]", r["dataset"]] == f"{res[(res['method'] == 'mind[official]') & (res['dataset'] == r['dataset'])].iloc[0]['dice_mean']:.3f} (1)"


def test_protocol_tag_names_rows_and_keeps_them_apart(cohorts, tmp_path):
    """Rows of a tagged run (other settings of one method) are method@tag[preset] and resume on their own names;
    bench/protocol.py's --set METHOD:KEY=VALUE reaches the method's settings, a malformed one is refused."""
    import importlib.util

    cfg = ProtocolConfig(methods=("intensity",), presets=("official",), tasks=("ctct",), pairs_per_task=1,
                         cohort=str(cohorts["evaluation"]), hd95=False, method_settings={"intensity": FAST},
                         tag="lam2")
    run_protocol(tmp_path / "p", cfg, progress=False)
    rows = pd.read_csv(tmp_path / "p" / "rows.csv")
    assert set(rows["method"]) == {"intensity@lam2[official]"}
    run_protocol(tmp_path / "p", cfg, progress=False)             # resumed by the tagged name
    assert len(pd.read_csv(tmp_path / "p" / "rows.csv")) == len(rows)

    spec = importlib.util.spec_from_file_location("bench_protocol", Path(__file__).parents[1] / "bench" / "protocol.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--out", str(tmp_path / "q"), "--set", "intensity=2"]) == 2
    out = tmp_path / "b"
    args = ["--out", str(out), "--methods", "intensity", "--presets", "official", "--tasks", "ctct", "--pairs", "1",
            "--cohort", str(cohorts["evaluation"]), "--no-hd95", "--tag", "lam", "--set", "intensity:lambda_weight=2.5"]
    for k, v in FAST.items():
        args += ["--set", f"intensity:{k}={v}"]
    assert bench.main(args) == 0
    got = json.loads((out / "protocol.json").read_text())
    assert got["rows"] == ["intensity@lam[official]"]
    assert got["config"]["method_settings"]["intensity"]["lambda_weight"] == "2.5"
    b = pd.read_csv(out / "rows.csv")
    # the setting reached the registration: a 2x lambda gives another field than the plain run
    assert not np.allclose(b.sort_values("label")["sdlogj"].to_numpy(), rows.sort_values("label")["sdlogj"].to_numpy())


def test_tag_table_pairs_tagged_rows_with_their_untagged_rows():
    """versus_untagged: dino3d@v4[official] against dino3d[official] on the shared pairs, hand-computed mean
    difference and the exact two-sided Wilcoxon p of 6 pairs that all improve (2 / 2^6 = 0.03125)."""
    from dinoreg_core.evaluation.protocol import tag_tables, untagged_name

    assert untagged_name("dino3d@v4[official]") == "dino3d[official]"
    assert untagged_name("dino3d+mind@v4[tuned]") == "dino3d+mind[tuned]"
    assert untagged_name("mind[official]") is None
    base = [0.30, 0.40, 0.35, 0.50, 0.45, 0.20]
    gain = [0.01, 0.02, 0.03, 0.04, 0.05, 0.06]
    rows = []
    for i, (b, g) in enumerate(zip(base, gain)):
        for method, d in (("dino3d[official]", b), ("dino3d@v4[official]", b + g), ("mind[official]", 0.9)):
            for label in (1, 2):        # two organs with the same Dice: the pair's mean is d
                rows.append({"dataset": "D", "task": "ctct", "pair": f"p{i}", "method": method, "label": label,
                             "label_name": f"organ{label}", "dice": d, "dice_initial": 0.1, "hd95_mm": np.nan,
                             "sdlogj": 0.1, "folding_pct": 0.0, "runtime_s": 1.0})
    t = tag_tables(pd.DataFrame(rows))
    assert list(t["method"]) == ["dino3d@v4[official]"]
    r = t.iloc[0]
    assert r["reference"] == "dino3d[official]" and r["pairs"] == 6
    assert r["dice_diff_vs_ref"] == pytest.approx(np.mean(gain))
    assert r["wilcoxon_p_vs_ref"] == pytest.approx(0.03125)
    assert tag_tables(pd.DataFrame([x for x in rows if "@" not in x["method"]])).empty


def test_preset_table_pairs_each_preset_with_the_official_row_of_its_method():
    """versus_official: mind[tuned_2mm] and dino3d@x[tuned] against mind[official] / dino3d@x[official] on the shared
    pairs; hand-computed mean difference and the exact two-sided Wilcoxon p of 5 pairs that all get worse (2/2^5)."""
    from dinoreg_core.evaluation.protocol import official_name, preset_tables

    assert official_name("mind[tuned_2mm]") == "mind[official]"
    assert official_name("dino3d@fixedgrid[tuned]") == "dino3d@fixedgrid[official]"
    assert official_name("mind[official]") is None and official_name("initial") is None
    base = [0.60, 0.55, 0.70, 0.65, 0.50]
    loss = [0.05, 0.04, 0.03, 0.02, 0.01]
    rows = []
    for i, (b, l) in enumerate(zip(base, loss)):
        for method, d in (("mind[official]", b), ("mind[tuned_2mm]", b - l), ("dino3d@x[official]", b),
                          ("dino3d@x[tuned]", b + l), ("intensity[tuned]", 0.3)):
            rows.append({"dataset": "D", "task": "ctct", "pair": f"p{i}", "method": method, "label": 1,
                         "label_name": "organ1", "dice": d, "dice_initial": 0.1, "hd95_mm": np.nan,
                         "sdlogj": 0.1, "folding_pct": 0.0, "runtime_s": 1.0})
    t = preset_tables(pd.DataFrame(rows)).set_index("method")
    assert sorted(t.index) == ["dino3d@x[tuned]", "mind[tuned_2mm]"]   # intensity has no official row to pair with
    assert t.loc["mind[tuned_2mm]", "reference"] == "mind[official]"
    assert t.loc["mind[tuned_2mm]", "dice_diff_vs_ref"] == pytest.approx(-np.mean(loss))
    assert t.loc["dino3d@x[tuned]", "dice_diff_vs_ref"] == pytest.approx(np.mean(loss))
    assert t.loc["mind[tuned_2mm]", "wilcoxon_p_vs_ref"] == pytest.approx(0.0625)


def test_protocol_refuses_to_resume_with_other_weights(tmp_path):
    """protocol.json records the sha256 of the dino3d weights of every weighted row; resuming the same folder with a
    changed weights file (e.g. the demo weights replaced in between) is refused in one sentence."""
    from dinoreg_core.evaluation.protocol import check_same_weights, weights_used

    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"weights a")
    b.write_bytes(b"weights b")
    cfg = ProtocolConfig(methods=("mind", "dino3d", "dino3d+mind"), presets=("official",), tasks=("ctct",),
                         method_settings={"dino3d": {"feat.weights": str(a)}, "dino3d+mind": {"feat.weights": str(a)}})
    used = weights_used(cfg)
    assert set(used) == {"dino3d", "dino3d+mind"} and used["dino3d"]["sha256"] == used["dino3d+mind"]["sha256"]
    out = tmp_path / "p"
    out.mkdir()
    (out / "protocol.json").write_text(json.dumps({"weights": used}))
    (out / "rows.csv").write_text("dataset\n")
    check_same_weights(out, used)                                 # the same weights: resumes
    cfg_b = ProtocolConfig(methods=("dino3d",), presets=("official",), tasks=("ctct",),
                           method_settings={"dino3d": {"feat.weights": str(b)}})
    with pytest.raises(DinoregError, match="differ from the ones the rows"):
        check_same_weights(out, weights_used(cfg_b))
    b.write_bytes(b"weights a")                                   # another path, the same bytes: the same weights
    check_same_weights(out, weights_used(cfg_b))


def test_bench_protocol_merge_renames_rows_all_at_once(tmp_path, capsys):
    """bench/protocol.py --tables-only --merge A B --rename: rows of both folders combined (the first folder wins on
    a duplicate), the names swapped in one pass (dino3d[official] -> dino3d@aware[official] and
    dino3d@fixedgrid[official] -> dino3d[official]); a rename without --merge or '=' is refused, exit 2."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_protocol", Path(__file__).parents[1] / "bench" / "protocol.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    def rows(methods_dice):
        return pd.DataFrame([{"dataset": "D", "task": "ctct", "pair": f"p{i}", "method": m, "base_method": "dino3d",
                              "preset": "official", "label": 1, "label_name": "liver", "dice": d + 0.01 * i,
                              "dice_initial": 0.1, "hd95_mm": np.nan, "sdlogj": 0.1, "sdlogj_l2r": 0.1,
                              "folding_pct": 0.0, "runtime_s": 1.0}
                             for m, d in methods_dice for i in range(3)])

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    rows([("dino3d[official]", 0.5), ("mind[official]", 0.7)]).to_csv(a / "rows.csv", index=False)
    rows([("dino3d@fixedgrid[official]", 0.6), ("mind[official]", 0.0)]).to_csv(b / "rows.csv", index=False)
    out = tmp_path / "t"
    assert bench.main(["--out", str(out), "--tables-only", "--presets", "official", "--merge", str(a), str(b),
                       "--rename", "dino3d[official]=dino3d@aware[official]",
                       "--rename", "dino3d@fixedgrid[official]=dino3d[official]"]) == 0
    got = pd.read_csv(out / "rows.csv").groupby("method")["dice"].mean().round(6).to_dict()
    assert got == {"dino3d@aware[official]": 0.51, "dino3d[official]": 0.61, "mind[official]": 0.71}
    assert "dino3d@aware[official]" in (out / "versus_untagged.md").read_text()
    capsys.readouterr()
    assert bench.main(["--out", str(out), "--tables-only", "--rename", "x=y"]) == 2
    assert bench.main(["--out", str(out), "--tables-only", "--merge", str(a), "--rename", "xy"]) == 2
    assert "--rename" in capsys.readouterr().err
