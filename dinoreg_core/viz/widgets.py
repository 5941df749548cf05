"""An ipywidgets slice viewer for a registration: :class:`SliceViewer`.

Controls: slicing direction (axial / coronal / sagittal), slice slider, layer (fixed, moving, warped, difference,
checkerboard, jacobian, features), label overlay (none / fixed / moving / warped) with opacity and an organ legend,
and a deformation-grid toggle. Every update renders ONE ``imshow`` of a composed RGB slice (plus the grid lines)
with matplotlib's Agg backend into an ``ipywidgets.Image`` (PNG), so the viewer needs no interactive matplotlib
backend and looks the same live and static.

Headless use: :meth:`SliceViewer.show` shows the live widget only where a Jupyter frontend can display it and a
static matplotlib figure otherwise (see :func:`live_frontend` for how that is decided); :meth:`SliceViewer.figure`
always gives the static figure of the current state and :meth:`SliceViewer.current` the arrays on display.

Arrays are canonical (D,H,W) on the fixed grid; slices follow :mod:`dinoreg_core.viz.plots` (raw ``a[:, :, k]``
for axial, shown in radiological orientation with the voxel-spacing aspect).
"""

from __future__ import annotations

import base64
import io as _io
import os
import sys

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from ..errors import DinoregError
from . import plots
from .feature_maps import features_to_rgb  # noqa: F401 - the viewer's colouring of feature volumes

LAYERS = ("fixed", "moving", "warped", "difference", "checkerboard", "jacobian", "features")
OVERLAYS = ("none", "fixed", "moving", "warped")
DIFF_CMAP = "RdBu_r"  # difference layer: blue = warped darker than fixed, red = brighter
JAC_CMAP = "RdBu_r"  # Jacobian layer: blue = compression (J<1), red = expansion (J>1); J <= 0 (folding) black
JAC_RANGE = (0.0, 2.0)


# ---------------------------------------------------------------------------------------------------------------
# pure helpers (numpy in, numpy out)

FIGURE_WIDTH_IN = 7.8  # whole figure (image + legend + colour bar), about 700 px at the widget's 90 dpi
LEGEND_WIDTH_IN = 2.0
COLORBAR_WIDTH_IN = 1.0
FIGURE_MARGIN_IN = 0.2
MIN_IMAGE_WIDTH_IN = 2.0


def checkerboard(a: np.ndarray, b: np.ndarray, block: int) -> np.ndarray:
    """Interleave two equally shaped 2D slices in ``block`` x ``block`` squares: the square at (0,0) comes from
    ``a``, its neighbours from ``b``."""
    if a.shape != b.shape:
        raise DinoregError(f"Checkerboard needs slices of one shape, got {a.shape} and {b.shape}.")
    i = np.arange(a.shape[0])[:, None] // int(block)
    j = np.arange(a.shape[1])[None, :] // int(block)
    return np.where((i + j) % 2 == 0, a, b)


def deformed_grid(u1: np.ndarray, u2: np.ndarray, step: int) -> list[np.ndarray]:
    """Lines of a regular grid in a slice mapped by ``x -> x + u(x)`` (in-plane displacement components).

    Args:
        u1, u2: (n1,n2) displacement (voxels) along the raw slice's first and second axes.
        step: grid spacing in voxels.

    Returns:
        A list of (P,2) arrays of points (first, second raw-slice coordinates, voxels): first the lines at fixed
        first coordinate p = 0, step, ... (P = n2 points each), then those at fixed second coordinate (P = n1).
    """
    n1, n2 = u1.shape
    q = np.arange(n2, dtype=np.float32)
    p = np.arange(n1, dtype=np.float32)
    lines = [np.stack([i + u1[i, :], q + u2[i, :]], axis=1) for i in range(0, n1, step)]
    lines += [np.stack([p + u1[:, j], j + u2[:, j]], axis=1) for j in range(0, n2, step)]
    return lines


def colormap_rgb(image: np.ndarray, cmap: str, vmin: float, vmax: float) -> np.ndarray:
    """(h,w) values -> (h,w,3) RGB in [0,1] through a matplotlib colormap on [vmin, vmax] (clipped)."""
    return colormaps[cmap](Normalize(vmin, vmax, clip=True)(image))[..., :3].astype(np.float32)


def live_frontend() -> bool:
    """Whether :meth:`SliceViewer.show` should show the live widget (True) or a static figure (False).

    Decided in this order:

    1. the environment variable ``DINOREG_VIZ``: ``static`` -> False, ``live`` -> True;
    2. not inside an IPython kernel (a plain script, terminal IPython) -> False;
    3. a kernel started by a Jupyter server for a notebook (JupyterLab, Notebook 7: the server sets
       ``JPY_SESSION_NAME`` in the kernel's environment), VS Code (``VSCODE_PID``) or Colab -> True;
    4. otherwise -> False: papermill, ``nbclient`` and ``jupyter nbconvert --execute`` start kernels without
       ``JPY_SESSION_NAME``, so a headless run stores static figures.
    """
    forced = os.environ.get("DINOREG_VIZ", "").strip().lower()
    if forced in ("static", "live"):
        return forced == "live"
    ip = _ipython()
    if ip is None or not hasattr(ip, "kernel"):
        return False
    return bool(os.environ.get("JPY_SESSION_NAME") or os.environ.get("VSCODE_PID") or "google.colab" in sys.modules)


def _ipython():
    mod = sys.modules.get("IPython")
    return mod.get_ipython() if mod is not None else None


def _array(x, what: str, dtype=None) -> np.ndarray | None:
    """numpy array of ``x`` (an io.Volume, torch tensor or array), or None."""
    if x is None:
        return None
    if hasattr(x, "array") and hasattr(x, "affine"):
        x = x.array
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 5 and a.shape[:2] == (1, 1):
        a = a[0, 0]
    if a.ndim != 3:
        raise DinoregError(f"{what} must be a (D,H,W) volume, got shape {a.shape}.")
    return a.astype(dtype, copy=False) if dtype is not None else a


# ---------------------------------------------------------------------------------------------------------------

class SliceViewer:
    """Interactive slices of a registration (fixed, moving, warped, labels, field, features).

    Args:
        fixed: (D,H,W) fixed image (array, tensor or :class:`dinoreg_core.io.Volume`).
        moving: (D,H,W) moving image on the fixed grid (e.g. ``RegistrationResult.moving_on_fixed``).
        warped: (D,H,W) warped moving image.
        fixed_labels, moving_labels, warped_labels: (D,H,W) integer label maps on the fixed grid.
        displacement: (3,D,H,W) or (1,3,D,H,W) backward field in fixed voxels (``warped(x) = moving(x + u(x))``);
            enables the ``jacobian`` layer and the deformation grid.
        features: (D,H,W,3) PCA-RGB on the fixed grid, raw features (C,d,h,w) / (1,C,d,h,w), or a dict
            method -> either (layers ``features:<method>``).
        label_names: label id -> organ name for the legend.
        spacing: voxel size (mm) for the pixel aspect (default: the fixed Volume's spacing, else 1 mm).
        grid_step: deformation-grid spacing (voxels); checker_size: checkerboard square (voxels, default 1/8 of the
            smallest dimension, at least 4).

    The state is ``axis``, ``index``, ``layer``, ``overlay``, ``opacity`` and ``grid``; change it with the controls
    of :attr:`widget` or with :meth:`set`; :meth:`current` returns what is on display.
    """

    def __init__(self, fixed, moving=None, warped=None, *, fixed_labels=None, moving_labels=None, warped_labels=None,
                 displacement=None, features=None, label_names=None, spacing=None, grid_step: int = 6,
                 checker_size: int | None = None):
        if spacing is None:
            spacing = fixed.spacing if hasattr(fixed, "spacing") and hasattr(fixed, "affine") else (1.0, 1.0, 1.0)
        self.spacing = tuple(float(s) for s in spacing)
        self.images = {"fixed": _array(fixed, "fixed", np.float32)}
        shape = self.images["fixed"].shape
        for name, v in (("moving", moving), ("warped", warped)):
            if v is not None:
                self.images[name] = _array(v, name, np.float32)
        self.labels = {name: _array(v, f"{name}_labels") for name, v in
                       (("fixed", fixed_labels), ("moving", moving_labels), ("warped", warped_labels)) if v is not None}
        self.displacement = None
        if displacement is not None:
            d = displacement.detach().cpu().numpy() if isinstance(displacement, torch.Tensor) else \
                np.asarray(displacement)
            d = d[0] if d.ndim == 5 else d
            if d.shape != (3,) + shape:
                raise DinoregError(f"displacement must be (3,D,H,W) = {(3,) + shape}, got {d.shape}.")
            self.displacement = d.astype(np.float32, copy=False)
        if features is None:
            features = {}
        self.features = {f"features:{k}": features_to_rgb(v, shape) for k, v in features.items()} \
            if isinstance(features, dict) else {"features": features_to_rgb(features, shape)}
        for name, a in list(self.images.items()) + [(f"{k}_labels", v) for k, v in self.labels.items()]:
            if a.shape != shape:
                raise DinoregError(f"{name} has shape {a.shape}; expected the fixed grid {shape}.")
        self.label_names = {int(k): str(v) for k, v in (label_names or {}).items()}
        ids = set()
        for lab in self.labels.values():
            ids |= set(np.unique(lab).tolist())
        self.colors = plots.label_colors(ids)
        self.grid_step = int(grid_step)
        self.checker_size = int(checker_size or max(4, min(shape) // 8))
        self.windows = {k: plots.intensity_window(v) for k, v in self.images.items()}
        self._jacobian = None
        self._diff_limit = None
        self.state = {"axis": "axial", "index": self.default_index("axial"), "layer": "fixed",
                      "overlay": "none", "opacity": 0.4, "grid": False}
        self._last_index = {"axial": self.state["index"]}  # each view's last slice, restored when it comes back
        self._widget = None
        self.controls = {}
        self._syncing = False

    @classmethod
    def from_result(cls, result, label_names=None, features=None, **kwargs) -> "SliceViewer":
        """Viewer of a :class:`dinoreg_core.api.RegistrationResult` (images, labels and field on the fixed grid)."""
        return cls(result.fixed.array, result.moving_on_fixed, result.warped, fixed_labels=result.fixed_labels,
                   moving_labels=result.moving_labels_on_fixed, warped_labels=result.warped_labels,
                   displacement=result.displacement, features=features, label_names=label_names,
                   spacing=result.fixed.spacing, **kwargs)

    # -- what can be shown --------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return self.images["fixed"].shape

    def layers(self) -> list[str]:
        """Layers available with the data given (in :data:`LAYERS` order; one ``features:<m>`` per method)."""
        out = [k for k in ("fixed", "moving", "warped") if k in self.images]
        if len(self.images) > 1:
            out += ["difference", "checkerboard"]
        if self.displacement is not None:
            out.append("jacobian")
        return out + list(self.features)

    def overlays(self) -> list[str]:
        """``none`` plus the label maps given."""
        return ["none"] + [k for k in ("fixed", "moving", "warped") if k in self.labels]

    def default_index(self, axis: str) -> int:
        """Slice with the most fixed foreground labels (or the middle slice) along ``axis``."""
        return plots.default_index(self.shape, axis, self.labels.get("fixed"))

    def jacobian(self) -> np.ndarray:
        """(D,H,W) Jacobian determinant of ``x -> x + u(x)`` (computed once, central differences)."""
        if self.displacement is None:
            raise DinoregError("No displacement was given: the jacobian layer is not available.")
        if self._jacobian is None:
            from ..registration.warp import jacobian_determinant

            with torch.no_grad():
                self._jacobian = jacobian_determinant(torch.from_numpy(self.displacement)[None])[0].numpy()
        return self._jacobian

    def _comparison_image(self) -> str:
        return "warped" if "warped" in self.images else "moving"

    # -- state --------------------------------------------------------------------------------------------------
    def set(self, **changes) -> "SliceViewer":
        """Change the state (``axis``, ``index``, ``layer``, ``overlay``, ``opacity``, ``grid``) and redraw.

        A new ``axis`` without an ``index`` returns to the slice that view showed last (first visit:
        :meth:`default_index`). Returns ``self``.
        """
        unknown = set(changes) - set(self.state)
        if unknown:
            raise DinoregError(f"Unknown viewer setting(s) {sorted(unknown)}; use {', '.join(self.state)}.")
        new = dict(self.state, **changes)
        plots.axis_number(new["axis"])
        if "axis" in changes and "index" not in changes and changes["axis"] != self.state["axis"]:
            new["index"] = self._last_index.get(new["axis"], self.default_index(new["axis"]))
        n = self.shape[plots.axis_number(new["axis"])]
        if not 0 <= int(new["index"]) < n:
            raise DinoregError(f"Slice index {new['index']} is outside 0..{n - 1} for the {new['axis']} axis.")
        if new["layer"] not in self.layers():
            raise DinoregError(f"Layer '{new['layer']}' is not available; available: {', '.join(self.layers())}.")
        if new["overlay"] in (None, False):
            new["overlay"] = "none"
        if new["overlay"] not in self.overlays():
            raise DinoregError(f"Overlay '{new['overlay']}' is not available; available: {', '.join(self.overlays())}.")
        if new["grid"] and self.displacement is None:
            raise DinoregError("No displacement was given: the deformation grid is not available.")
        new["index"], new["opacity"], new["grid"] = int(new["index"]), float(new["opacity"]), bool(new["grid"])
        self.state = new
        self._last_index[new["axis"]] = new["index"]
        self._sync_controls()
        self._redraw()
        return self

    # -- what is on display -------------------------------------------------------------------------------------
    def _layer_slice(self, layer: str, axis: str, k: int) -> np.ndarray:
        """The 2D raw slice of ``layer`` (n1,n2), or (n1,n2,3) for a features layer."""
        if layer in self.images:
            return plots.take_slice(self.images[layer], axis, k)
        if layer == "difference":
            other = self._comparison_image()
            return plots.take_slice(self.images[other], axis, k) - plots.take_slice(self.images["fixed"], axis, k)
        if layer == "checkerboard":
            other = self._comparison_image()
            a = plots.normalise(plots.take_slice(self.images["fixed"], axis, k), self.windows["fixed"])
            b = plots.normalise(plots.take_slice(self.images[other], axis, k), self.windows[other])
            return checkerboard(a, b, self.checker_size)
        if layer == "jacobian":
            return plots.take_slice(self.jacobian(), axis, k)
        return plots.take_slice(self.features[layer], axis, k)

    def _color_scale(self, layer: str) -> tuple[str | None, float, float]:
        """(colormap, vmin, vmax) used to colour ``layer`` (colormap None: RGB already)."""
        if layer in self.images:
            return ("gray",) + tuple(self.windows[layer])
        if layer == "difference":
            if self._diff_limit is None:
                d = self.images[self._comparison_image()] - self.images["fixed"]
                self._diff_limit = float(np.percentile(np.abs(d), 99.5)) or 1.0
            return DIFF_CMAP, -self._diff_limit, self._diff_limit
        if layer == "checkerboard":
            return "gray", 0.0, 1.0
        if layer == "jacobian":
            return (JAC_CMAP,) + JAC_RANGE
        return None, 0.0, 1.0

    def current(self) -> dict:
        """The arrays on display, in raw slice order (``plots.take_slice``; not yet display-oriented):

        ``image``: (n1,n2) values of the layer (intensities; warped - fixed for ``difference``, moving - fixed when
        no warped image was given; window-normalised [0,1] squares of fixed / warped (or moving) for
        ``checkerboard``; det J for ``jacobian``) or (n1,n2,3) RGB for
        ``features``; ``overlay``: (n1,n2) integer labels or None; ``grid``: list of (P,2) deformed grid lines
        (:func:`deformed_grid`) or None; plus ``axis``, ``index``, ``layer``, ``opacity`` and the colour scale
        ``cmap``, ``vmin``, ``vmax``.
        """
        s = self.state
        axis, k = s["axis"], s["index"]
        image = self._layer_slice(s["layer"], axis, k)
        overlay = None if s["overlay"] == "none" else plots.take_slice(self.labels[s["overlay"]], axis, k)
        grid = None
        if s["grid"]:
            ax = plots.axis_number(axis)
            c1, c2 = [c for c in range(3) if c != ax]
            grid = deformed_grid(plots.take_slice(self.displacement[c1], axis, k),
                                 plots.take_slice(self.displacement[c2], axis, k), self.grid_step)
        cmap, vmin, vmax = self._color_scale(s["layer"])
        return {"axis": axis, "index": k, "layer": s["layer"], "image": image, "overlay": overlay, "grid": grid,
                "opacity": s["opacity"], "cmap": cmap, "vmin": vmin, "vmax": vmax}

    def rgb(self, shown: dict | None = None) -> np.ndarray:
        """(n1,n2,3) RGB in [0,1] of the current layer with the label overlay blended in (raw slice order)."""
        c = shown or self.current()
        img = c["image"]
        if c["cmap"] is None:
            rgb = np.clip(img, 0, 1).astype(np.float32)
        else:
            rgb = colormap_rgb(img, c["cmap"], c["vmin"], c["vmax"])
            if c["layer"] == "jacobian":
                rgb[img <= 0] = 0.0
        if c["overlay"] is not None:
            rgb = plots.blend_labels(rgb, c["overlay"], self.colors, c["opacity"])
        return rgb

    def figure(self, legend: bool = True, width: float = FIGURE_WIDTH_IN) -> Figure:
        """Static matplotlib figure of the current state: one imshow, the grid lines, an organ legend when an
        overlay is on and a colour bar for the difference and jacobian layers.

        ``width``: the whole figure's width (inches). The legend and the colour bar take their room from the image
        (:data:`LEGEND_WIDTH_IN`, :data:`COLORBAR_WIDTH_IN`), so every layer's figure has the same width and fits
        the output area the widget gives it.
        """
        c = self.current()
        s1, s2 = plots.in_plane_spacing(c["axis"], self.spacing)
        has_legend = legend and c["overlay"] is not None and bool(set(np.unique(c["overlay"]).tolist()) - {0})
        extra = (LEGEND_WIDTH_IN if has_legend else 0.0) + \
            (COLORBAR_WIDTH_IN if c["layer"] in ("difference", "jacobian") else 0.0)
        image_w = max(width - extra - FIGURE_MARGIN_IN, MIN_IMAGE_WIDTH_IN)
        height = image_w * (c["image"].shape[1] * s2) / (c["image"].shape[0] * s1)
        fig = plots.NotebookFigure(figsize=(image_w + extra + FIGURE_MARGIN_IN, height + 0.45), layout="constrained")
        ax = fig.add_subplot()
        rgb = self.rgb(c)
        n1, n2 = rgb.shape[:2]
        ax.imshow(plots.display_orientation(rgb), aspect=plots.display_aspect(c["axis"], self.spacing),
                  interpolation="nearest")
        if c["grid"] is not None:
            segs = [np.stack([n1 - 1 - line[:, 0], n2 - 1 - line[:, 1]], axis=1) for line in c["grid"]]
            ax.add_collection(LineCollection(segs, colors="yellow", linewidths=0.6, alpha=0.8))
            ax.set_xlim(-0.5, n1 - 0.5)
            ax.set_ylim(n2 - 0.5, -0.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"{c['layer']} | {c['axis']} {c['index']}/{self.shape[plots.axis_number(c['axis'])] - 1}"
                     + (f" | labels: {self.state['overlay']}" if c["overlay"] is not None else ""), fontsize=9)
        if c["layer"] in ("difference", "jacobian"):
            from matplotlib.cm import ScalarMappable

            fig.colorbar(ScalarMappable(Normalize(c["vmin"], c["vmax"]), cmap=c["cmap"]), ax=ax, shrink=0.7,
                         label="warped - fixed" if c["layer"] == "difference" else "det J (<= 0 black)")
        if has_legend:
            handles = plots.legend_handles(self.colors, self.label_names, set(np.unique(c["overlay"]).tolist()))
            fig.legend(handles=handles, loc="outside right center", fontsize=7, frameon=False)
        return fig

    def png(self, dpi: int = 90) -> bytes:
        """PNG bytes of :meth:`figure`."""
        buf = _io.BytesIO()
        self.figure().savefig(buf, format="png", dpi=dpi)
        return buf.getvalue()

    # -- widget -------------------------------------------------------------------------------------------------
    @property
    def widget(self):
        """The ipywidgets container (controls beside the rendered slice), built on first access."""
        if self._widget is None:
            self._build_widget()
        return self._widget

    def _build_widget(self) -> None:
        try:
            import ipywidgets as w
        except ImportError:
            raise DinoregError("The slice viewer needs ipywidgets: pip install -e .[notebooks]") from None
        s = self.state
        style = {"description_width": "70px"}
        c = {
            "axis": w.ToggleButtons(options=list(plots.AXES)[::-1], value=s["axis"], description="view",
                                    style={"button_width": "78px", **style}),
            "index": w.IntSlider(value=s["index"], min=0, max=self.shape[plots.axis_number(s["axis"])] - 1,
                                 description="slice", continuous_update=True, style=style),
            "layer": w.Dropdown(options=self.layers(), value=s["layer"], description="layer", style=style),
            "overlay": w.ToggleButtons(options=self.overlays(), value=s["overlay"], description="labels",
                                       style={"button_width": "74px", **style}),
            "opacity": w.FloatSlider(value=s["opacity"], min=0.0, max=1.0, step=0.05, description="opacity",
                                     continuous_update=False, style=style),
            "grid": w.Checkbox(value=s["grid"], description="deformation grid", disabled=self.displacement is None,
                               indent=False),
        }
        self.controls = c
        # the image scales down to the room the output area leaves beside the controls (never overflows it)
        self.image_widget = w.Image(value=self.png(), format="png",
                                    layout=w.Layout(width="auto", max_width="100%", height="auto", object_fit="contain"))
        for name, ctl in c.items():
            ctl.observe(self._on_control(name), names="value")
        image_box = w.Box([self.image_widget], layout=w.Layout(flex="1 1 0%", min_width="0", max_width="100%"))
        self._widget = w.HBox([w.VBox(list(c.values()), layout=w.Layout(min_width="400px", flex="0 0 auto")), image_box],
                              layout=w.Layout(width="100%", flex_flow="row wrap"))

    def _on_control(self, name: str):
        def handler(change):
            if not self._syncing:
                self.set(**{name: change["new"]})
        return handler

    def _sync_controls(self) -> None:
        """Put the state into the controls without triggering their handlers."""
        if not self.controls:
            return
        self._syncing = True
        try:
            idx = self.controls["index"]
            n = self.shape[plots.axis_number(self.state["axis"])]
            if idx.max != n - 1:
                idx.value = min(idx.value, n - 1)
                idx.max = n - 1
            for name, ctl in self.controls.items():
                if ctl.value != self.state[name]:
                    ctl.value = self.state[name]
        finally:
            self._syncing = False

    def _redraw(self) -> None:
        if self._widget is not None:
            self.image_widget.value = self.png()

    # -- display ------------------------------------------------------------------------------------------------
    def show(self, interactive: bool | None = None):
        """Show the viewer: the live widget in a Jupyter frontend, else a static figure.

        ``interactive=None`` decides with :func:`live_frontend` (papermill and other headless runs give static
        figures). The live output also carries a PNG of the first view, which frontends without widget support
        (GitHub, nbviewer) show instead. In IPython the output is displayed and None returned; outside IPython
        the static :class:`~matplotlib.figure.Figure` is returned (save it with ``plots.save_figure``).
        """
        live = live_frontend() if interactive is None else bool(interactive)
        ip = _ipython()
        if ip is None:
            if live:
                raise DinoregError("The live viewer needs a Jupyter frontend; use show(interactive=False) or figure().")
            return self.figure()
        from IPython.display import Image, display

        if live:
            display(_LiveView(self.widget, self.png()))
        else:
            display(Image(data=self.png(dpi=100), format="png"))
        return None


class _LiveView:
    """Display bundle: the widget view plus a static PNG fallback for frontends without widget support."""

    def __init__(self, widget, png: bytes):
        self.widget, self.png = widget, png

    def _repr_mimebundle_(self, **kwargs):
        data = self.widget._repr_mimebundle_(**kwargs)
        if isinstance(data, tuple):
            data = data[0]
        data = dict(data)
        data["image/png"] = base64.b64encode(self.png).decode("ascii")
        return data
