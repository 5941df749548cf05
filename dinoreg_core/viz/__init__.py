"""Figures and the notebook slice viewer (needs the ``[notebooks]`` extra: matplotlib, ipywidgets).

* :mod:`dinoreg_core.viz.plots`: static matplotlib figures (loss curves, PCA-RGB feature maps, the methods
  comparison, the qualitative panel) and :func:`~dinoreg_core.viz.plots.save_figure`.
* :mod:`dinoreg_core.viz.widgets`: :class:`~dinoreg_core.viz.widgets.SliceViewer`, an ipywidgets viewer of a
  registration that falls back to static figures when run headless.

Submodules are imported on first use (``from dinoreg_core.viz import plots``, ``viz.SliceViewer``), so importing
this package needs neither matplotlib nor ipywidgets.
"""

from __future__ import annotations

import importlib

__all__ = ["plots", "widgets", "SliceViewer"]


def __getattr__(name: str):
    if name in ("plots", "widgets"):
        return importlib.import_module(f"{__name__}.{name}")
    if name == "SliceViewer":
        return importlib.import_module(f"{__name__}.widgets").SliceViewer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
