"""Static figures (matplotlib only, Agg-safe): loss curves, PCA-RGB feature maps, the methods comparison
(paper Figure 2 style) and the qualitative panel; :func:`save_figure` writes any of them atomically.

Conventions shared with :mod:`dinoreg_core.viz.widgets`:

* Volumes are canonical (D,H,W) numpy arrays (RAS+ after :func:`dinoreg_core.io.load_volume`).
* ``axis`` names a slicing direction: ``"axial"`` takes ``a[:, :, k]``, ``"coronal"`` ``a[:, k, :]``,
  ``"sagittal"`` ``a[k, :, :]`` (:func:`take_slice`, raw array order). For display a slice is transposed and
  flipped (:func:`display_orientation`) to the radiological view: patient right on the viewer's left, anterior
  (axial) or superior (coronal, sagittal) at the top; the pixel aspect follows the voxel spacing.
* ``index=None`` means the slice with the most foreground labels when labels are given, else the middle slice
  (:func:`default_index`).
* Every figure function returns a :class:`NotebookFigure` (a :class:`matplotlib.figure.Figure` created without
  pyplot that renders itself as PNG in IPython), so a figure is shown in a notebook when it is a cell's value (or
  passed to ``display``), also when pyplot was never imported, and nothing accumulates in pyplot's global state.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from ..atomic import atomic_path
from ..errors import DinoregError

AXES = {"sagittal": 0, "coronal": 1, "axial": 2}  # slicing direction -> array axis that is fixed
CT_DISPLAY_WINDOW = (-160.0, 240.0)  # HU, abdominal soft-tissue window for display
_PALETTE = colormaps["tab20"](np.linspace(0, 1, 20))[[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3, 5, 7, 9, 11, 13,
                                                       15, 17, 19], :3]


class NotebookFigure(Figure):
    """A matplotlib Figure that IPython shows as a PNG (``_repr_png_``) without pyplot or an inline backend."""

    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()


# ---------------------------------------------------------------------------------------------------------------
# slicing and colouring helpers (shared with the widget)

def axis_number(axis: str) -> int:
    """Array axis held fixed by the slicing direction ``axis`` ("axial" -> 2, "coronal" -> 1, "sagittal" -> 0)."""
    try:
        return AXES[axis]
    except KeyError:
        raise DinoregError(f"Unknown slice axis '{axis}'; use one of {', '.join(AXES)}.") from None


def take_slice(volume: np.ndarray, axis: str, index: int) -> np.ndarray:
    """Raw slice of a (D,H,W) or (D,H,W,C) array: axial ``v[:, :, k]``, coronal ``v[:, k, :]``, sagittal ``v[k]``."""
    ax = axis_number(axis)
    n = volume.shape[ax]
    if not 0 <= index < n:
        raise DinoregError(f"Slice index {index} is outside 0..{n - 1} for the {axis} axis.")
    return np.take(volume, int(index), axis=ax)


def display_orientation(raw: np.ndarray) -> np.ndarray:
    """(n1,n2[,C]) raw slice -> (n2,n1[,C]) display image: transposed, rows and columns reversed (radiological)."""
    return np.swapaxes(raw, 0, 1)[::-1, ::-1]


def in_plane_spacing(axis: str, spacing=(1.0, 1.0, 1.0)) -> tuple[float, float]:
    """Voxel size (mm) along the raw slice's first and second axes."""
    ax = axis_number(axis)
    s = [float(x) for i, x in enumerate(spacing) if i != ax]
    return s[0], s[1]


def display_aspect(axis: str, spacing=(1.0, 1.0, 1.0)) -> float:
    """imshow ``aspect`` (row height / column width) of a displayed slice: spacing of axis 2 over axis 1 in-plane."""
    s1, s2 = in_plane_spacing(axis, spacing)
    return s2 / s1


def default_index(shape, axis: str, labels: np.ndarray | None = None) -> int:
    """The slice with the most foreground labels when ``labels`` (D,H,W) has any, else the middle slice."""
    ax = axis_number(axis)
    if labels is not None and np.any(labels > 0):
        other = tuple(i for i in range(3) if i != ax)
        return int(np.argmax((np.asarray(labels) > 0).sum(axis=other)))
    return int(shape[ax] // 2)


def intensity_window(volume: np.ndarray) -> tuple[float, float]:
    """Display window: the abdominal CT window (HU) for CT-like volumes (1st percentile < -500), else the
    0.5th..99.5th percentiles."""
    v = np.asarray(volume)
    sub = v.reshape(-1)[:: max(1, v.size // 500_000)]
    if np.percentile(sub, 1) < -500.0:
        return CT_DISPLAY_WINDOW
    lo, hi = np.percentile(sub, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def normalise(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Map intensities linearly from ``window`` (lo, hi) to [0,1] and clip; float32, same shape."""
    lo, hi = window
    return np.clip((np.asarray(image, dtype=np.float32) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)


def label_colors(ids) -> dict[int, tuple[float, float, float]]:
    """A fixed RGB colour (components in [0,1]) per label id: the ids, sorted, take tab20 colours in turn."""
    ids = sorted(int(i) for i in set(ids) if int(i) != 0)
    return {i: tuple(float(c) for c in _PALETTE[n % len(_PALETTE)]) for n, i in enumerate(ids)}


def blend_labels(rgb: np.ndarray, labels: np.ndarray, colors: dict, opacity: float) -> np.ndarray:
    """Alpha-blend label colours onto an (h,w,3) RGB image in [0,1] where ``labels`` (h,w) is non-zero.

    Labels without a colour in ``colors`` are left out. Returns a new (h,w,3) float32 array.
    """
    out = np.array(rgb, dtype=np.float32, copy=True)
    if not colors or opacity <= 0:
        return out
    ids = np.array(sorted(colors), dtype=np.int64)
    lut_idx = np.searchsorted(ids, labels)
    lut_idx = np.clip(lut_idx, 0, len(ids) - 1)
    known = (ids[lut_idx] == labels) & (labels != 0)
    table = np.array([colors[i] for i in ids], dtype=np.float32)
    col = table[lut_idx]
    a = float(opacity)
    out[known] = (1.0 - a) * out[known] + a * col[known]
    return out


def gray_rgb(image: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """(h,w) intensities -> (h,w,3) gray RGB in [0,1] through :func:`normalise`."""
    g = normalise(image, window)
    return np.repeat(g[..., None], 3, axis=-1)


def legend_handles(colors: dict, names: dict | None, present=None) -> list[Patch]:
    """Legend patches ``id: name`` for the labels in ``colors`` (restricted to ``present`` ids when given)."""
    ids = [i for i in sorted(colors) if present is None or i in present]
    return [Patch(facecolor=colors[i], edgecolor="none", label=str((names or {}).get(i, f"label {i}"))) for i in ids]


def _names(label_names) -> dict[int, str]:
    return {int(k): str(v) for k, v in (label_names or {}).items()}


def _clean_axes(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------------------------
# figures

LOSS_GROUPS = (
    ("loss", ("loss", "dino_loss", "ibot_loss", "dense_loss", "koleo_loss")),
    ("entropy (nats; collapse monitors)", ("teacher_entropy", "teacher_marginal_entropy", "patch_entropy",
                                           "patch_marginal_entropy")),
    ("feature spread (std)", ("cls_std", "patch_std")),
    ("validation Dice (registration)", ("val_dice", "val_dice_ctct", "val_dice_mrmr", "val_dice_mrct")),
)


def loss_curves(log) -> Figure:
    """Pretraining curves vs step: one panel per group of :data:`LOSS_GROUPS` that the log has columns for.

    Args:
        log: path to a pretraining ``log.csv`` (columns ``step`` and some of ``loss``, ``dino_loss``,
            ``ibot_loss``, ``dense_loss``, ``koleo_loss``, ``teacher_entropy``, ``teacher_marginal_entropy``,
            ``patch_entropy``, ``patch_marginal_entropy``, ``cls_std``, ``patch_std``, and the validation Dice
            ``val_dice*`` of checkpoint selection by registration, logged every few steps) or such a DataFrame.

    Falling marginal entropy with low per-sample entropy is healthy; both entropies collapsing towards 0 (one
    prototype for everything) or the per-sample entropy staying at the marginal one (uniform targets) are the
    two collapse modes DINO training can fall into.
    """
    df = pd.read_csv(log) if isinstance(log, (str, os.PathLike)) else pd.DataFrame(log)
    if "step" not in df.columns:
        raise DinoregError("The pretraining log has no 'step' column.")
    groups = [(title, [c for c in cols if c in df.columns and df[c].notna().any()]) for title, cols in LOSS_GROUPS]
    groups = [(t, cols) for t, cols in groups if cols]
    if not groups:
        known = sorted({c for _, cols in LOSS_GROUPS for c in cols})
        raise DinoregError(f"The pretraining log has none of the known columns ({', '.join(known)}).")
    fig = NotebookFigure(figsize=(4.2 * len(groups), 3.4), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (title, cols) in zip(axes, groups):
        for c in cols:
            d = df[["step", c]].dropna()                       # validation rows are sparse: points joined by lines
            ax.plot(d["step"].to_numpy(), d[c].to_numpy(dtype=float), label=c, lw=1.4,
                    marker="o" if len(d) < len(df) else None, ms=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def feature_maps(image: np.ndarray, rgb: dict, axis: str = "axial", index: int | None = None,
                 spacing=(1.0, 1.0, 1.0)) -> Figure:
    """The image slice next to one PCA-RGB feature map per method, side by side (1 + len(rgb) panels).

    Args:
        image: (D,H,W) intensities (HU for CT).
        rgb: method name -> (D,H,W,3) RGB in [0,1] on the image grid (e.g. from
            :func:`dinoreg_core.features.pca.pca_rgb` upsampled to the image grid).
        axis, index: slicing direction and slice (``None``: middle slice).
        spacing: voxel size (mm) for the pixel aspect.
    """
    image = np.asarray(image)
    for name, v in rgb.items():
        if tuple(np.shape(v)) != tuple(image.shape) + (3,):
            raise DinoregError(f"Feature map '{name}' has shape {np.shape(v)}; expected {tuple(image.shape) + (3,)} "
                               "(RGB on the image grid).")
    k = default_index(image.shape, axis) if index is None else int(index)
    aspect = display_aspect(axis, spacing)
    n = 1 + len(rgb)
    fig = NotebookFigure(figsize=(3.0 * n, 3.3), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    axes[0].imshow(display_orientation(normalise(take_slice(image, axis, k), intensity_window(image))), cmap="gray",
                   vmin=0, vmax=1, aspect=aspect, interpolation="nearest")
    axes[0].set_title(f"image ({axis} {k})", fontsize=10)
    for ax, (name, v) in zip(axes[1:], rgb.items()):
        ax.imshow(np.clip(display_orientation(take_slice(np.asarray(v), axis, k)), 0, 1), aspect=aspect,
                  interpolation="nearest")
        ax.set_title(f"{name} PCA-RGB", fontsize=10)
    for ax in axes:
        _clean_axes(ax)
    return fig


METRIC_LABELS = {"dice": "Dice (mean over labels)", "hd95_mm": "HD95 (mm, mean over labels)",
                 "hd95_vox": "HD95 (voxels, mean over labels)", "sdlogj": "SDlogJ", "sdlogj_l2r": "SDlogJ (L2R)",
                 "folding_pct": "folding (% voxels)", "runtime_s": "runtime (s)", "peak_rss_mb": "peak memory (MB)"}


def per_pair_values(df: pd.DataFrame, metric: str = "dice") -> pd.DataFrame:
    """Per (dataset, method, pair) mean of ``metric`` over labels (NaN labels left out): columns dataset, method,
    pair, value."""
    missing = {"dataset", "method", "pair", metric} - set(df.columns)
    if missing:
        raise DinoregError(f"The results table lacks the columns {sorted(missing)} (expected the evaluate() table).")
    return (df.groupby(["dataset", "method", "pair"], sort=False)[metric].mean().rename("value").reset_index())


def plotting_order(methods, order=None) -> list[str]:
    """``order`` restricted to ``methods`` when given, else the methods as they come with ``initial`` first."""
    methods = list(dict.fromkeys(methods))
    if order is not None:
        return [m for m in order if m in methods]
    return sorted(methods, key=lambda m: (m != "initial", methods.index(m)))


def method_comparison(df: pd.DataFrame, metric: str = "dice", order=None) -> Figure:
    """Paper Figure-2 style comparison: one panel per dataset; per method a box plot of the per-pair values with
    every pair drawn as a point (grey lines join the points of one pair across methods) and the mean printed
    above the box.

    Args:
        df: the tidy :func:`dinoreg_core.evaluation.runner.evaluate` table (one row per dataset, pair, method,
            label); the per-pair value is the mean of ``metric`` over labels (:func:`per_pair_values`).
        metric: column to plot (``dice``, ``hd95_mm``, ``sdlogj``, ``folding_pct``, ...).
        order: methods to show, in this order (default: as they come, ``initial`` first).
    """
    pp = per_pair_values(df, metric)
    datasets = list(dict.fromkeys(pp["dataset"]))
    if not datasets:
        raise DinoregError("The results table is empty.")
    fig = NotebookFigure(figsize=(max(3.2, 1.1 * pp["method"].nunique() + 1.2) * len(datasets), 3.8), layout="constrained")
    axes = fig.subplots(1, len(datasets), squeeze=False)[0]
    rng = np.random.default_rng(0)
    for ax, ds in zip(axes, datasets):
        sub = pp[pp["dataset"] == ds]
        methods = plotting_order(sub["method"], order)
        table = sub.pivot(index="pair", columns="method", values="value").reindex(columns=methods)
        jitter = rng.uniform(-0.12, 0.12, size=len(table))
        for row, dx in zip(table.to_numpy(), jitter):
            ax.plot(np.arange(1, len(methods) + 1) + dx, row, color="0.75", lw=0.6, zorder=1)
        data = [table[m].dropna().to_numpy() for m in methods]
        ax.boxplot(data, positions=np.arange(1, len(methods) + 1), widths=0.55, showfliers=False,
                   medianprops={"color": "k"}, zorder=2)
        for i, m in enumerate(methods):
            ax.scatter(i + 1 + jitter, table[m].to_numpy(), s=14, color=_PALETTE[i % len(_PALETTE)],
                       edgecolor="k", linewidth=0.3, zorder=3)
        values = np.concatenate(data) if data else np.zeros(0)
        pad = 0.04 * (float(np.ptp(values)) if values.size else 1.0) or 0.01
        for i, d in enumerate(data):
            if d.size:
                ax.text(i + 1, d.max() + pad, f"{d.mean():.3f}", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(np.arange(1, len(methods) + 1), methods, rotation=30, ha="right")
        ax.set_title(f"{ds} (n={len(table)} pairs)", fontsize=10)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        ax.grid(axis="y", alpha=0.3)
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi + 0.08 * (hi - lo))
    return fig


def _summary_numbers(m: dict) -> dict[str, float]:
    """Dice, SDlogJ and folding of a metrics dict: flat ``{"dice", "sdlogj", "folding_pct"}`` or the
    :class:`dinoreg_core.api.RegistrationResult` ``metrics`` layout (``summary`` / ``field``)."""
    flat = dict(m)
    flat.update(m.get("field", {}) if isinstance(m.get("field"), dict) else {})
    flat.update(m.get("summary", {}) if isinstance(m.get("summary"), dict) else {})
    return {k: float(flat.get(k, np.nan)) for k in ("dice", "sdlogj", "folding_pct")}


def metric_text(m: dict) -> str:
    """One-line annotation: ``Dice 0.912  SDlogJ 0.126  fold 0.00%``."""
    v = _summary_numbers(m)
    return f"Dice {v['dice']:.3f}  SDlogJ {v['sdlogj']:.3f}  fold {v['folding_pct']:.2f}%"


def qualitative_panel(fixed_image: np.ndarray, fixed_labels: np.ndarray, moving_labels: np.ndarray, warped: dict,
                      metrics: dict, axis: str = "axial", index: int | None = None, label_names=None,
                      spacing=(1.0, 1.0, 1.0), opacity: float = 0.5) -> Figure:
    """Qualitative comparison like the paper's: fixed image, fixed labels, moving labels, then the warped moving
    labels of each method, all over the fixed image, with Dice, SDlogJ and folding printed on each method's panel.

    Args:
        fixed_image: (D,H,W) fixed intensities.
        fixed_labels, moving_labels: (D,H,W) integer label maps on the fixed grid (moving: before registration).
        warped: method -> (D,H,W) warped moving labels.
        metrics: method -> metrics dict with ``dice``, ``sdlogj``, ``folding_pct`` (or a RegistrationResult's
            ``metrics``: ``summary["dice"]``, ``field["sdlogj"]``, ``field["folding_pct"]``).
        axis, index: slicing direction and slice (``None``: the slice with the most fixed foreground labels).
        label_names: id -> organ name for the legend.
        spacing: voxel size (mm) for the pixel aspect; opacity: label fill opacity in [0,1].
    """
    fixed_image = np.asarray(fixed_image)
    for name, a in [("fixed_labels", fixed_labels), ("moving_labels", moving_labels)] + list(warped.items()):
        if np.shape(a) != fixed_image.shape:
            raise DinoregError(f"{name} has shape {np.shape(a)}; expected the fixed grid {fixed_image.shape}.")
    k = default_index(fixed_image.shape, axis, fixed_labels) if index is None else int(index)
    names = _names(label_names)
    colors = label_colors(set(np.unique(fixed_labels).tolist()) | set(np.unique(moving_labels).tolist()))
    base = gray_rgb(take_slice(fixed_image, axis, k), intensity_window(fixed_image))
    panels = [("fixed image", None, None), ("fixed labels", fixed_labels, None), ("moving labels", moving_labels, None)]
    panels += [(name, lab, metric_text(metrics.get(name, {}))) for name, lab in warped.items()]
    aspect = display_aspect(axis, spacing)
    n = len(panels)
    fig = NotebookFigure(figsize=(2.8 * n + 1.6, 3.5), layout="constrained")
    axes = fig.subplots(1, n, squeeze=False)[0]
    present = set()
    for ax, (title, lab, text) in zip(axes, panels):
        img = base
        if lab is not None:
            sl = take_slice(np.asarray(lab), axis, k)
            present |= set(np.unique(sl).tolist())
            img = blend_labels(base, sl, colors, opacity)
        ax.imshow(display_orientation(img), aspect=aspect, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        if text:
            ax.text(0.5, -0.02, text, transform=ax.transAxes, ha="center", va="top", fontsize=8)
        _clean_axes(ax)
    handles = legend_handles(colors, names, present)
    if handles:
        fig.legend(handles=handles, loc="outside right center", fontsize=7, frameon=False)
    fig.suptitle(f"{axis} slice {k}", fontsize=10)
    return fig


def save_figure(fig: Figure, path, dpi: int = 120) -> Path:
    """Write ``fig`` to ``path`` (format from the suffix: .png, .pdf, .svg) atomically, then close the figure.

    The file is first written under a temporary name in the same folder and renamed onto ``path``, so an
    interrupted write never leaves a truncated figure. Creates the parent folder. Returns ``path``.
    """
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in ("png", "pdf", "svg"):
        raise DinoregError(f"Cannot save a figure as '{path.name}': use a .png, .pdf or .svg file name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi)
    finally:
        _close(fig)
    return path


def _close(fig: Figure) -> None:
    """Close ``fig`` in pyplot when pyplot manages it (figures made here are not; closing is then a no-op)."""
    import sys

    plt = sys.modules.get("matplotlib.pyplot")
    if plt is not None:
        plt.close(fig)
