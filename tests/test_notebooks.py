"""The notebook suite: committed without outputs, house style (first cell, commented parameters, hand-over), the
profiles match the notebooks' parameters, and 00_quickstart executes through papermill on a tiny pair.

Notebooks 01-04 are executed through papermill by tests/test_reproduce.py (the tiny profile), which checks their
CSV/PNG outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from dinoreg_core import reproduce

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["00_quickstart", "01_pretrain_3d_dino", "02_feature_maps", "03_evaluate_registration", "04_paper_figures"]


def _params_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1
    return cells[0]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_clean_and_in_house_style(name):
    nb = nbformat.read(str(NOTEBOOKS / f"{name}.ipynb"), as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.outputs == [] and c.execution_count is None, f"{name}: commit notebooks without outputs"
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.startswith("# ") and "**Time**" in first.source
    params = _params_cell(nb)
    assert nb.cells.index(params) == 1
    for line in params.source.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert "#" in line, f"{name}: parameter without a comment: {line}"
            # papermill parses one '=' per line; more makes it warn and skip the parameter
            assert line.count("=") == 1, f"{name}: {line}"
    assert {"run_dir", "figures_dir", "tables_dir"} <= set(reproduce.notebook_parameters(NOTEBOOKS / f"{name}.ipynb"))
    assert "write_handoff" in nb.cells[-1].source and nb.cells[-1].cell_type == "code"
    assert nb.metadata["kernelspec"]["name"] == "python3"


@pytest.mark.parametrize("profile", ["demo", "paper"])
def test_profiles_name_only_existing_parameters(profile, tmp_path):
    prof = reproduce.load_profile(profile)
    steps = reproduce.resolve(prof, out=tmp_path, run_id=profile)
    assert list(steps) == list(reproduce.STEPS)
    assert steps["03_evaluate_registration"]["run_dir"] == str(tmp_path / "runs" / profile)


def test_quickstart_executes(tmp_path, monkeypatch):
    import papermill as pm
    import torch

    from dinoreg_core.data.phantom import PhantomConfig, generate_cohort
    from dinoreg_core.models.checkpoint import save_backbone
    from dinoreg_core.models.vit3d import ViT3D, ViT3DConfig

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    generate_cohort(tmp_path / "cohort", PhantomConfig(n_subjects=2, n_val_subjects=2, shape=(40, 32, 36), spacing_mm=8.0,
                                                       workers=1, mr_fraction=0.0), progress=False)
    img = lambda c: str(tmp_path / "cohort" / "imagesTr" / f"SynthAbdomen_{c:04d}_0000.nii.gz")
    cfg = ViT3DConfig(embed_dim=48, depth=2, num_heads=4, pos_grid=(8, 8, 8))
    torch.manual_seed(0)
    w = save_backbone(ViT3D(cfg), cfg, tmp_path / "bb", {"note": "random test weights"})
    run, figs = tmp_path / "run", tmp_path / "figs"
    params = {"fixed": img(1), "moving": img(2), "fixed_labels": img(1).replace("imagesTr", "labelsTr"),
              "moving_labels": img(2).replace("imagesTr", "labelsTr"), "methods": ["intensity", "mind", "dino3d"],
              "dino3d_weights": str(w), "run_dir": str(run), "figures_dir": str(figs),
              "tables_dir": str(tmp_path / "tabs"), "settings": {"mind": {"grid_sp": 4}}}
    pm.execute_notebook(str(NOTEBOOKS / "00_quickstart.ipynb"), str(tmp_path / "00.ipynb"), parameters=params,
                        kernel_name="python3", progress_bar=False)
    table = pd.read_csv(run / "quickstart_methods.csv")
    assert list(table["method"]) == ["intensity", "mind", "dino3d"]
    assert np.isfinite(table[["dice_before", "dice_after", "sdlogj", "folding_pct", "time_s"]].to_numpy()).all()
    png = figs / "quickstart_viewer.png"
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    hand = json.loads((run / "handoff" / "00_quickstart.json").read_text())
    assert hand["best_method"] in table["method"].tolist()
