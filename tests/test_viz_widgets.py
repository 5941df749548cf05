"""SliceViewer on the real CT warped by a known deformation: move the controls, check what is displayed."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

pytest.importorskip("ipywidgets")
pytest.importorskip("matplotlib")

from dinoreg_core.api import RegistrationResult  # noqa: E402
from dinoreg_core.demo import known_deformation_pair  # noqa: E402
from dinoreg_core.errors import DinoregError  # noqa: E402
from dinoreg_core.registration.warp import warp, warp_labels  # noqa: E402
from dinoreg_core.viz import plots, widgets  # noqa: E402
from dinoreg_core.viz.widgets import SliceViewer  # noqa: E402


@pytest.fixture(scope="module")
def pair(real_dir):
    """The real CT (fixed), its known-deformation copy (moving) and the moving image and labels warped back with
    the true inverse field (what a perfect registration returns)."""
    p = known_deformation_pair(max_disp_mm=10.0, seed=0, ct_path=real_dir / "ct_abdomen_pelvis.nii.gz")
    u = torch.from_numpy(p.true_disp)[None]
    with torch.no_grad():
        warped = warp(torch.from_numpy(p.moving.array)[None, None], u)[0, 0].numpy()
        warped_lab = warp_labels(torch.from_numpy(p.moving_labels.array)[None, None], u)[0, 0].numpy()
    return p, warped, warped_lab


@pytest.fixture()
def viewer(pair):
    p, warped, warped_lab = pair
    v = SliceViewer(p.fixed, p.moving.array, warped, fixed_labels=p.fixed_labels, moving_labels=p.moving_labels,
                    warped_labels=warped_lab, displacement=p.true_disp, label_names=p.label_names)
    v.widget  # build the controls
    return v


def test_slider_moves_the_axial_slice(viewer, pair):
    fixed = pair[0].fixed.array
    c = viewer.controls
    assert viewer.state["axis"] == "axial" and c["index"].max == fixed.shape[2] - 1
    # the default slice is the one with the most fixed organ voxels
    assert c["index"].value == int(np.argmax((pair[0].fixed_labels.array > 0).sum(axis=(0, 1))))
    before = viewer.image_widget.value
    for k in (10, 57, fixed.shape[2] - 1):
        c["index"].value = k
        shown = viewer.current()
        assert shown["index"] == k and shown["image"].shape == fixed.shape[:2]
        np.testing.assert_array_equal(shown["image"], fixed[:, :, k])
    assert viewer.image_widget.value != before and viewer.image_widget.value[:8] == b"\x89PNG\r\n\x1a\n"


def test_view_toggle_switches_axis_and_slider_range(viewer, pair):
    p = pair[0]
    fixed, lab = p.fixed.array, p.fixed_labels.array
    c = viewer.controls
    c["axis"].value = "coronal"
    j = int(np.argmax((lab > 0).sum(axis=(0, 2))))
    assert c["index"].max == fixed.shape[1] - 1 and c["index"].value == j
    np.testing.assert_array_equal(viewer.current()["image"], fixed[:, j, :])
    c["axis"].value = "sagittal"
    c["index"].value = 30
    assert c["index"].max == fixed.shape[0] - 1
    np.testing.assert_array_equal(viewer.current()["image"], fixed[30])


def test_layer_switch_shows_each_volume(viewer, pair):
    p, warped, _ = pair
    c = viewer.controls
    assert c["layer"].options == ("fixed", "moving", "warped", "difference", "checkerboard", "jacobian")
    c["index"].value = 60
    c["layer"].value = "moving"
    np.testing.assert_array_equal(viewer.current()["image"], p.moving.array[:, :, 60])
    c["layer"].value = "warped"
    np.testing.assert_array_equal(viewer.current()["image"], warped[:, :, 60])
    # the deformation is real: moving differs from fixed on this slice, the warped-back image is much closer
    f = p.fixed.array[:, :, 60]
    assert np.abs(warped[:, :, 60] - f).mean() < 0.6 * np.abs(p.moving.array[:, :, 60] - f).mean()


def test_difference_layer_is_warped_minus_fixed(viewer, pair):
    p, warped, _ = pair
    viewer.controls["index"].value = 45
    viewer.controls["layer"].value = "difference"
    shown = viewer.current()
    np.testing.assert_allclose(shown["image"], warped[:, :, 45] - p.fixed.array[:, :, 45])
    assert shown["cmap"] == widgets.DIFF_CMAP and shown["vmin"] == -shown["vmax"] > -np.inf


def test_checkerboard_alternates_fixed_and_warped_blocks(viewer, pair):
    p, warped, _ = pair
    viewer.set(layer="checkerboard", index=50)
    img = viewer.current()["image"]
    b = viewer.checker_size
    nf = plots.normalise(p.fixed.array[:, :, 50], viewer.windows["fixed"])
    nw = plots.normalise(warped[:, :, 50], viewer.windows["warped"])
    assert not np.allclose(nf[:b, b:2 * b], nw[:b, b:2 * b])  # the two images differ there
    np.testing.assert_array_equal(img[:b, :b], nf[:b, :b])
    np.testing.assert_array_equal(img[:b, b:2 * b], nw[:b, b:2 * b])
    np.testing.assert_array_equal(img[b:2 * b, :b], nw[b:2 * b, :b])
    np.testing.assert_array_equal(img[b:2 * b, b:2 * b], nf[b:2 * b, b:2 * b])


def test_label_overlay_on_off_and_opacity(viewer, pair):
    p, _, warped_lab = pair
    c = viewer.controls
    assert c["overlay"].options == ("none", "fixed", "moving", "warped")
    k = c["index"].value
    assert viewer.current()["overlay"] is None
    plain = viewer.rgb()
    c["overlay"].value = "fixed"
    lab = p.fixed_labels.array[:, :, k]
    np.testing.assert_array_equal(viewer.current()["overlay"], lab)
    tinted = viewer.rgb()
    changed = np.any(np.abs(tinted - plain) > 1e-6, axis=-1)
    np.testing.assert_array_equal(changed, lab > 0)  # colour only where there are organs
    c["overlay"].value = "warped"
    np.testing.assert_array_equal(viewer.current()["overlay"], warped_lab[:, :, k])
    c["opacity"].value = 0.0
    np.testing.assert_allclose(viewer.rgb(), plain)
    c["overlay"].value = "none"
    assert viewer.current()["overlay"] is None


def test_legend_names_the_organs_on_the_slice(viewer, pair):
    p = pair[0]
    viewer.set(overlay="fixed")
    fig = viewer.figure()
    names = {t.get_text() for leg in fig.legends for t in leg.get_texts()}
    k = viewer.state["index"]
    expected = {p.label_names[i] for i in np.unique(p.fixed_labels.array[:, :, k]) if i != 0}
    assert names == expected and "liver" in names


def test_jacobian_layer_and_grid_of_the_true_field(viewer, pair):
    p = pair[0]
    c = viewer.controls
    c["layer"].value = "jacobian"
    c["grid"].value = True
    shown = viewer.current()
    k = shown["index"]
    assert shown["image"].shape == p.fixed.shape[:2]
    assert 0.3 < shown["image"].min() < 0.99 and 1.01 < shown["image"].max() < 3.0  # a real, non-folding field
    assert not np.allclose(shown["image"], 1.0)
    # the first grid line: fixed first coordinate 0, displaced by the in-plane field components 0 and 1
    first = shown["grid"][0]
    np.testing.assert_allclose(first[:, 0], p.true_disp[0, 0, :, k])
    np.testing.assert_allclose(first[:, 1], np.arange(p.fixed.shape[1]) + p.true_disp[1, 0, :, k])
    step = viewer.grid_step
    n1, n2 = p.fixed.shape[:2]
    assert len(shown["grid"]) == len(range(0, n1, step)) + len(range(0, n2, step))


def test_jacobian_of_a_zero_field_is_one_and_its_grid_is_regular(pair):
    p = pair[0]
    v = SliceViewer(p.fixed, p.moving, displacement=np.zeros((3,) + p.fixed.shape, np.float32))
    v.widget
    v.controls["layer"].value = "jacobian"
    v.controls["grid"].value = True
    shown = v.current()
    np.testing.assert_array_equal(shown["image"], np.ones(p.fixed.shape[:2], np.float32))
    line = shown["grid"][1]  # second line: first coordinate = grid_step
    np.testing.assert_array_equal(line[:, 0], v.grid_step)
    np.testing.assert_array_equal(line[:, 1], np.arange(p.fixed.shape[1]))


def test_features_layer_shows_pca_rgb_on_the_image_grid(pair):
    p = pair[0]
    from dinoreg_core.api import compute_features
    from dinoreg_core.preprocess import normalize_intensity

    n = normalize_intensity(p.fixed.array, "ct")
    ff, _ = compute_features("mind", n, n, fixed_modality="ct", moving_modality="ct", device=torch.device("cpu"))
    v = SliceViewer(p.fixed, features={"mind": ff[:, :, ::2, ::2, ::2]})  # coarse features are resized to the grid
    assert v.layers() == ["fixed", "features:mind"]
    v.set(layer="features:mind", index=40)
    img = v.current()["image"]
    assert img.shape == p.fixed.shape[:2] + (3,) and 0.0 <= img.min() and img.max() <= 1.0
    np.testing.assert_array_equal(img, v.features["features:mind"][:, :, 40])
    assert img.reshape(-1, 3).std(axis=0).min() > 0.05  # three informative channels


def test_from_result_wires_every_field(pair):
    p, warped, warped_lab = pair
    res = RegistrationResult(p.true_disp, p.fixed, p.moving.array, warped, np.eye(4), p.fixed_labels.array,
                             p.moving_labels.array, warped_lab)
    v = SliceViewer.from_result(res, label_names=p.label_names)
    assert v.layers() == ["fixed", "moving", "warped", "difference", "checkerboard", "jacobian"]
    assert v.overlays() == ["none", "fixed", "moving", "warped"]
    assert v.spacing == tuple(float(s) for s in p.fixed.spacing)
    v.set(layer="warped", overlay="moving", index=33)
    np.testing.assert_array_equal(v.current()["image"], warped[:, :, 33])
    np.testing.assert_array_equal(v.current()["overlay"], p.moving_labels.array[:, :, 33])


def test_invalid_settings_are_refused(viewer, pair):
    with pytest.raises(DinoregError, match="outside"):
        viewer.set(index=pair[0].fixed.shape[2])
    with pytest.raises(DinoregError, match="not available"):
        viewer.set(layer="features")
    with pytest.raises(DinoregError, match="Unknown viewer setting"):
        viewer.set(zoom=2)
    bare = SliceViewer(pair[0].fixed)
    with pytest.raises(DinoregError, match="deformation grid"):
        bare.set(grid=True)


def test_static_fallback_outside_jupyter(viewer, monkeypatch):
    monkeypatch.delenv("DINOREG_VIZ", raising=False)
    assert widgets.live_frontend() is False  # plain Python: no kernel
    monkeypatch.setenv("DINOREG_VIZ", "live")
    assert widgets.live_frontend() is True
    monkeypatch.setenv("DINOREG_VIZ", "static")
    fig = viewer.show()
    assert len(fig.axes) == 1 and fig.axes[0].get_images()[0].get_array().shape[-1] == 3
    with pytest.raises(DinoregError, match="Jupyter frontend"):
        viewer.show(interactive=True)


def test_live_bundle_carries_widget_view_and_png(viewer):
    bundle = widgets._LiveView(viewer.widget, viewer.png())._repr_mimebundle_()
    view = bundle["application/vnd.jupyter.widget-view+json"]
    assert view["model_id"] == viewer.widget.model_id
    assert base64.b64decode(bundle["image/png"])[:4] == b"\x89PNG"
    json.dumps(bundle)


def test_papermill_run_stores_a_static_figure(tmp_path, monkeypatch, real_dir):
    """Headless execution (papermill) of a notebook calling show(): a PNG output, no widget view."""
    pm = pytest.importorskip("papermill")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    monkeypatch.delenv("DINOREG_VIZ", raising=False)
    monkeypatch.delenv("JPY_SESSION_NAME", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = ("from dinoreg_core import io\nfrom dinoreg_core.viz import SliceViewer\n"
            f"ct = io.load_volume({str(real_dir / 'ct_abdomen_pelvis.nii.gz')!r})\n"
            "SliceViewer(ct, ct.array + 100.0).show()")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)])
    src, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, src)
    pm.execute_notebook(str(src), str(out), kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    outputs = nbformat.read(out, as_version=4).cells[0].outputs
    data = [o.get("data", {}) for o in outputs if o.output_type == "display_data"]
    assert len(data) == 1 and "image/png" in data[0]
    assert "application/vnd.jupyter.widget-view+json" not in data[0]
    assert base64.b64decode(data[0]["image/png"])[:4] == b"\x89PNG"


def test_each_view_keeps_its_last_slice(viewer, pair):
    c = viewer.controls
    c["axis"].value = "axial"
    c["index"].value = 12
    c["axis"].value = "coronal"
    c["index"].value = 7
    c["axis"].value = "sagittal"  # first visit: the default slice
    assert c["index"].value == viewer.default_index("sagittal")
    c["axis"].value = "axial"
    assert c["index"].value == 12 and viewer.current()["index"] == 12
    c["axis"].value = "coronal"
    assert c["index"].value == 7 and viewer.state["index"] == 7


def test_difference_and_jacobian_figures_keep_the_figure_width(viewer):
    from dinoreg_core.viz.widgets import FIGURE_WIDTH_IN

    widths = {}
    for layer, overlay in (("fixed", "none"), ("difference", "none"), ("jacobian", "fixed"), ("warped", "fixed")):
        viewer.set(layer=layer, overlay=overlay)
        widths[(layer, overlay)] = viewer.figure().get_size_inches()[0]
    assert all(abs(w - FIGURE_WIDTH_IN) < 1e-6 for w in widths.values()), widths
    # the widget lets the image shrink to its output area instead of overflowing it
    assert viewer.image_widget.layout.max_width == "100%" and viewer.widget.layout.flex_flow == "row wrap"
