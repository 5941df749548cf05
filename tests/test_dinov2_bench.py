"""bench/features_cost.py: matched resolution, extrapolation arithmetic, tables (no heavy compute)."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the dinov2 method needs transformers (extra [dinov2])")

BENCH = Path(__file__).resolve().parents[1] / "bench" / "features_cost.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("features_cost", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_matched_setting_gives_the_dino3d_token_grid(bench):
    from dinoreg_core.models.dinov2_slices import _encoded_slices, token_grid

    for shape in [(128, 128, 128), (192, 160, 192)]:
        opts = bench.dinov2_options("matched", shape)
        assert token_grid(shape[:2], opts["target_tokens"]) == (shape[0] // 4, shape[1] // 4)
        assert len(_encoded_slices(shape[2], opts["every_k"])) == shape[2] // 4 + 1  # 0, 4, ..., and the last
    authors = bench.dinov2_options("authors", (192, 160, 192))
    assert (authors["target_tokens"], authors["keep_aspect"], authors["every_k"]) == (64, False, 6)


def test_run_case_in_process_small(bench):
    import torch

    threads = torch.get_num_threads()
    try:
        row = bench.run_case("dinov2_s14_matched", (16, 12, 9), "cpu", threads=1)
        assert row["feature_shape"] == [1, 384, 4, 3, 9]
        assert row["time_s"] > 0 and row["mem_mb"] > 0 and row["threads"] == 1
        row = bench.run_case("mind", (16, 12, 9), "cpu", threads=1)
        assert row["feature_shape"] == [1, 12, 16, 12, 9]
    finally:
        torch.set_num_threads(threads)


def test_extrapolation_and_tables(bench, tmp_path, monkeypatch):
    calls = []

    def fake(case, shape, device, slices, timeout, threads):  # 5 s per encoded slice, 300 MB at this size
        calls.append(slices)
        k = bench.dinov2_options(bench.CASES[case]["setting"], shape)["every_k"]
        n = slices or shape[2]
        m = (n - 1) // k + 1
        return dict(case=case, shape=list(shape), slices=n, time_s=5.0 * m, peak_rss_mb=600.0,
                    mem_mb=300.0, cuda_peak_mb=None, feature_shape=[1, 1024, 64, 64, n], note="")

    monkeypatch.setattr(bench, "_subprocess", fake)
    row = bench.measure("dinov2_l14_authors", (192, 160, 192), "cpu", 2, None, 1)
    assert calls == [19]  # at least one full batch of 4 encoded slices: 0, 6, 12, 18
    assert row["extrapolated"] == "yes" and row["encoded_slices"] == 33  # 0, 6, ..., 186 and 191
    assert row["time_s"] == pytest.approx(5.0 * 33)
    assert row["mem_mb"] == pytest.approx(300 + (192 - 19) * 1024 * 64 * 64 * 4 / 2**20)
    assert row["feature_shape"] == [1, 1024, 64, 64, 192]
    # cases small enough run whole
    small = bench.measure("dinov2_l14_authors", (64, 64, 13), "cpu", 4, None, 1)
    assert calls[-1] is None and small["extrapolated"] == "no" and small["encoded_slices"] == 3  # 0, 6, 12

    rows = [dict(row, volume="192x160x192", date="d", machine="m", device="cpu", method="dinov2", config="vitl14",
                 setting="authors", load_1min=1.0),
            dict(case="dino3d_paper", volume="192x160x192", time_s=11.0, mem_mb=242.0, cuda_peak_mb=None,
                 feature_shape=[1, 180, 48, 40, 48], encoded_slices="", extrapolated="no", note="full pass",
                 date="d", machine="m", device="cpu", method="dino3d", config="paper", setting="")]
    bench.add_ratios(rows)
    assert rows[0]["time_ratio_vs_dino3d_paper"] == pytest.approx(15.0)
    assert rows[0]["mem_ratio_vs_dino3d_paper"] == pytest.approx(round(rows[0]["mem_mb"] / 242.0, 2))
    out = tmp_path / "features_cost.csv"
    bench.write_tables(rows, {"torch": "x", "load_avg": "0"}, out)
    table = list(csv.DictReader(out.open()))
    assert table[0]["case"] == "dinov2_l14_authors" and float(table[0]["time_ratio_vs_dino3d_paper"]) == 15.0
    md = out.with_suffix(".md").read_text()
    assert "| 192x160x192 | dino3d_paper |" in md and "measured on the first 19 slices (4 encoded)" in md
