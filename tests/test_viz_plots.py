"""Static figures on small real data: the real CT at half resolution (6 mm) warped by known deformations and
registered with the intensity and MIND features, the demo pretraining log, and save_figure's atomic write."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402

from dinoreg_core import io  # noqa: E402
from dinoreg_core.api import RegisterConfig, compute_features, register  # noqa: E402
from dinoreg_core.demo import known_deformation_pair  # noqa: E402
from dinoreg_core.errors import DinoregError  # noqa: E402
from dinoreg_core.evaluation.runner import PairSpec, evaluate  # noqa: E402
from dinoreg_core.features.pca import pca_rgb  # noqa: E402
from dinoreg_core.preprocess import normalize_intensity  # noqa: E402
from dinoreg_core.viz import plots  # noqa: E402

REPO_LOG = Path(__file__).resolve().parents[1] / "results" / "pretrain" / "demo_run1" / "log.csv"
METHODS = ["intensity", "mind"]


@pytest.fixture(scope="module")
def small_ct(real_dir, tmp_path_factory):
    """The real CT and its labels, every second voxel (6 mm), written as NIfTI for the demo-pair maker."""
    d = tmp_path_factory.mktemp("ct6mm")
    ct = io.load_volume(real_dir / "ct_abdomen_pelvis.nii.gz")
    lab = io.load_labels(real_dir / "ct_abdomen_pelvis_labels.nii.gz")
    aff = ct.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    io.save_nifti(ct.array[::2, ::2, ::2], aff, d / "ct.nii.gz")
    io.save_nifti(lab.array[::2, ::2, ::2].astype(np.int32), aff, d / "ct_labels.nii.gz")
    return d


def _pair_files(small_ct, max_disp_mm, seed):
    """A known-deformation pair of the small CT written to files; returns (PairSpec, DemoPair)."""
    p = known_deformation_pair(max_disp_mm=max_disp_mm, seed=seed, control_spacing=5, ct_path=small_ct / "ct.nii.gz")
    stem = small_ct / f"d{int(max_disp_mm)}_s{seed}"
    io.save_nifti(p.fixed_labels.array, p.fixed.affine, f"{stem}_fixed_labels.nii.gz")
    io.save_nifti(p.moving.array, p.fixed.affine, f"{stem}_moving.nii.gz")
    io.save_nifti(p.moving_labels.array, p.fixed.affine, f"{stem}_moving_labels.nii.gz")
    spec = PairSpec(f"seed{seed}", small_ct / "ct.nii.gz", Path(f"{stem}_moving.nii.gz"),
                    Path(f"{stem}_fixed_labels.nii.gz"), Path(f"{stem}_moving_labels.nii.gz"),
                    fixed_modality="ct", moving_modality="ct")
    return spec, p


@pytest.fixture(scope="module")
def table(small_ct):
    """A real evaluate() table: 2 'datasets' (largest displacement 12 and 24 mm) x 2 pairs x 2 methods."""
    frames = []
    for disp in (12.0, 24.0):
        specs = [_pair_files(small_ct, disp, seed)[0] for seed in (0, 1)]
        frames.append(evaluate(specs, METHODS, dataset=f"CT {int(disp)} mm", progress=False))
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def registered(small_ct):
    """One pair registered with each method: the DemoPair and method -> RegistrationResult."""
    _, p = _pair_files(small_ct, 24.0, 0)
    res = {m: register(p.fixed, p.moving, fixed_labels=p.fixed_labels, moving_labels=p.moving_labels,
                       config=RegisterConfig(features=m, fixed_modality="ct", moving_modality="ct"),
                       label_names=p.label_names) for m in METHODS}
    return p, res


def test_loss_curves_of_the_demo_pretraining_log():
    if not REPO_LOG.exists():
        pytest.skip(f"{REPO_LOG} is not in this checkout")
    log = pd.read_csv(REPO_LOG)
    fig = plots.loss_curves(REPO_LOG)
    assert len(fig.axes) == 3
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["loss", "dino_loss", "ibot_loss", "koleo_loss"]
    np.testing.assert_allclose(lines[1].get_ydata(), log["dino_loss"].to_numpy())
    np.testing.assert_array_equal(lines[1].get_xdata(), log["step"].to_numpy())
    assert [ln.get_label() for ln in fig.axes[1].get_lines()] == ["teacher_entropy", "teacher_marginal_entropy",
                                                                  "patch_entropy", "patch_marginal_entropy"]
    # a log with only losses gives one panel; a table without steps is refused
    assert len(plots.loss_curves(log[["step", "loss", "koleo_loss"]]).axes) == 1
    with pytest.raises(DinoregError, match="step"):
        plots.loss_curves(log.drop(columns="step"))


def test_feature_maps_show_each_method_side_by_side(small_ct):
    ct = io.load_volume(small_ct / "ct.nii.gz")
    n = normalize_intensity(ct.array, "ct")
    rgb = {}
    for m in METHODS:
        f, _ = compute_features(m, n, n, fixed_modality="ct", moving_modality="ct", device=torch.device("cpu"))
        rgb[m] = pca_rgb(f)
    fig = plots.feature_maps(ct.array, rgb, axis="coronal", index=20, spacing=ct.spacing)
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == ["image (coronal 20)", "intensity PCA-RGB", "mind PCA-RGB"]
    shown = fig.axes[2].get_images()[0].get_array()
    np.testing.assert_allclose(shown, plots.display_orientation(rgb["mind"][:, 20, :]))
    gray = fig.axes[0].get_images()[0].get_array()
    np.testing.assert_allclose(gray, plots.display_orientation(plots.normalise(ct.array[:, 20, :], (-160, 240))))
    with pytest.raises(DinoregError, match="RGB on the image grid"):
        plots.feature_maps(ct.array, {"bad": rgb["mind"][::2]})


def test_method_comparison_boxes_points_and_means(table):
    fig = plots.method_comparison(table, "dice")
    assert len(fig.axes) == 2
    per_pair = table.groupby(["dataset", "method", "pair"])["dice"].mean()
    for ax, ds in zip(fig.axes, ["CT 12 mm", "CT 24 mm"]):
        assert ax.get_title() == f"{ds} (n=2 pairs)"
        assert [t.get_text() for t in ax.get_xticklabels()] == ["initial", "intensity", "mind"]
        texts = [t.get_text() for t in ax.texts]
        expected = [f"{per_pair[ds, m].mean():.3f}" for m in ["initial", "intensity", "mind"]]
        assert texts == expected
        points = [np.sort(c.get_offsets()[:, 1]) for c in ax.collections]
        assert len(points) == 3
        np.testing.assert_allclose(points[2], np.sort(per_pair[ds, "mind"].to_numpy()))
        # real registrations: MIND recovers part of the known deformation on every pair (+0.03..0.11 Dice at 6 mm)
        # and does better than raw intensities
        assert (per_pair[ds, "mind"] > per_pair[ds, "initial"] + 0.02).all()
        assert (per_pair[ds, "mind"] > per_pair[ds, "intensity"]).all()
    # order and another metric
    fig = plots.method_comparison(table, "folding_pct", order=["mind", "initial"])
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["mind", "initial"]
    assert fig.axes[0].get_ylabel() == "folding (% voxels)"
    with pytest.raises(DinoregError, match="columns"):
        plots.method_comparison(table.drop(columns="pair"))


def test_qualitative_panel_prints_metrics_per_method(registered):
    p, res = registered
    warped = {m: r.warped_labels for m, r in res.items()}
    fig = plots.qualitative_panel(p.fixed.array, p.fixed_labels.array, p.moving_labels.array, warped,
                                  {m: r.metrics for m, r in res.items()}, label_names=p.label_names,
                                  spacing=p.fixed.spacing)
    assert len(fig.axes) == 5
    assert [ax.get_title() for ax in fig.axes] == ["fixed image", "fixed labels", "moving labels"] + METHODS
    k = int(np.argmax((p.fixed_labels.array > 0).sum(axis=(0, 1))))
    assert fig._suptitle.get_text() == f"axial slice {k}"
    for ax, m in zip(fig.axes[3:], METHODS):
        r = res[m]
        (text,) = [t.get_text() for t in ax.texts]
        assert text == (f"Dice {r.metrics['summary']['dice']:.3f}  SDlogJ {r.metrics['field']['sdlogj']:.3f}  "
                        f"fold {r.metrics['field']['folding_pct']:.2f}%")
    assert res["mind"].metrics["summary"]["dice"] > res["mind"].metrics["summary"]["dice_initial"]
    # the first panel is the plain fixed slice in the CT window; the fixed-label panel is tinted where organs are
    base = plots.gray_rgb(p.fixed.array[:, :, k], plots.CT_DISPLAY_WINDOW)
    np.testing.assert_allclose(fig.axes[0].get_images()[0].get_array(), plots.display_orientation(base))
    tinted = fig.axes[1].get_images()[0].get_array()
    organs = plots.display_orientation(p.fixed_labels.array[:, :, k]) > 0
    assert np.all(np.any(np.abs(tinted - plots.display_orientation(base)) > 1e-6, axis=-1) == organs)
    legend = {t.get_text() for leg in fig.legends for t in leg.get_texts()}
    assert "liver" in legend and legend <= set(p.label_names.values())
    # flat metric dicts work as well
    fig = plots.qualitative_panel(p.fixed.array, p.fixed_labels.array, p.moving_labels.array,
                                  {"x": warped["mind"]}, {"x": {"dice": 0.5, "sdlogj": 0.25, "folding_pct": 1.0}},
                                  axis="sagittal", index=10)
    assert [t.get_text() for t in fig.axes[3].texts] == ["Dice 0.500  SDlogJ 0.250  fold 1.00%"]


def test_save_figure_writes_a_png_atomically(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    out = plots.save_figure(fig, tmp_path / "sub" / "fig.png")
    data = out.read_bytes()
    assert out == tmp_path / "sub" / "fig.png" and len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)  # closed
    assert sorted(p.name for p in out.parent.iterdir()) == ["fig.png"]
    # a write that fails half-way leaves the old file as it was and no temporary file behind
    fig2 = Figure()
    fig2.add_subplot()

    def broken(path, **kw):
        Path(path).write_bytes(b"\x89PNG partial")
        raise OSError("disk full")

    monkeypatch.setattr(fig2, "savefig", broken)
    with pytest.raises(OSError, match="disk full"):
        plots.save_figure(fig2, out)
    assert out.read_bytes() == data and sorted(p.name for p in out.parent.iterdir()) == ["fig.png"]
    pdf = plots.save_figure(plots.loss_curves(pd.DataFrame({"step": [1, 2], "loss": [2.0, 1.0]})),
                            tmp_path / "c.pdf")
    assert pdf.read_bytes()[:4] == b"%PDF"
    with pytest.raises(DinoregError, match=".png"):
        plots.save_figure(Figure(), tmp_path / "c.jpg")


def test_figures_show_as_png_in_a_kernel_without_pyplot(tmp_path, monkeypatch):
    """A figure that is a cell's value is displayed as a PNG even when pyplot was never imported (papermill)."""
    pm = pytest.importorskip("papermill")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    if not REPO_LOG.exists():
        pytest.skip(f"{REPO_LOG} is not in this checkout")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = f"import sys\nfrom dinoreg_core.viz import plots\nfig = plots.loss_curves({str(REPO_LOG)!r})\nfig"
    check = "print('matplotlib.pyplot' in sys.modules)"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code), nbformat.v4.new_code_cell(check)])
    nbformat.write(nb, tmp_path / "in.ipynb")
    pm.execute_notebook(str(tmp_path / "in.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                        progress_bar=False, cwd=str(tmp_path))
    cells = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells
    (result,) = [o for o in cells[0].outputs if o.output_type == "execute_result"]
    assert "image/png" in result.data and len(result.data["image/png"]) > 1000
    assert cells[1].outputs[0].text.strip() == "False"  # shown without pyplot
