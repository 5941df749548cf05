"""bench/end_to_end.py on a tiny synthetic cohort: 2 methods, 1 small pair -> CSV, labels CSV, settings JSON, table."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_end_to_end_bench_writes_the_table(tmp_path):
    from dinoreg_core.data.phantom import PhantomConfig, generate_cohort

    ds = generate_cohort(tmp_path / "cohort", PhantomConfig(n_subjects=2, shape=(40, 32, 36), spacing_mm=9.6,
                                                            n_val_subjects=2, mr_subjects=(), workers=1),
                         progress=False)
    out = tmp_path / "bench" / "end_to_end.csv"
    r = subprocess.run([sys.executable, str(REPO / "bench" / "end_to_end.py"), "--cohort", str(ds), "--sets", "ctct",
                        "--pairs", "1", "--methods", "intensity,mind", "--set", "mind.iterations=20",
                        "--set", "intensity.iterations=20", "--cache", str(tmp_path / "cache"), "--out", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = list(csv.DictReader(out.open()))
    assert [(x["set"], x["pair"], x["method"]) for x in rows] == [
        ("ctct", "0001_0002", "initial"), ("ctct", "0001_0002", "intensity"), ("ctct", "0001_0002", "mind")]
    assert all(x["status"] == "ok" for x in rows)
    init, inten, mind = rows
    assert float(init["dice"]) == float(init["dice_initial"]) and float(init["sdlogj"]) == 0.0
    for x in (inten, mind):
        assert 0.0 <= float(x["dice"]) <= 1.0 and float(x["time_s"]) > 0 and float(x["peak_rss_mb"]) > 50
        assert float(x["dice_initial"]) == float(init["dice"])  # the same starting point for every method
        assert float(x["sdlogj"]) > 0  # the field moved
        assert json.loads(x["settings"])["convex"]["iterations"] == 20
    assert int(mind["n_labels"]) >= 5
    labels = list(csv.DictReader(out.with_name("end_to_end_labels.csv").open()))
    assert len(labels) == 3 * int(mind["n_labels"])
    settings = json.loads(out.with_name("end_to_end_settings.json").read_text())
    assert set(settings["settings"]) == {"intensity", "mind"} and settings["machine"]["cores"] >= 1
    md = out.with_suffix(".md").read_text()
    assert "| initial |" in md and "| mind |" in md and "CT-CT" in md
