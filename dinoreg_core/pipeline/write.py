"""Stage 4, :func:`write`: the one place that writes a registration's files.

Into ``out`` (each file atomically): ``disp.nii.gz`` (the displacement in the fixed file's voxel axes, (D,H,W,3),
fixed voxels, backward), ``warped.nii.gz``, ``moving_on_fixed_grid.nii.gz`` (when the moving scan was resampled),
``warped_labels.nii.gz`` (with moving labels), the Learn2Reg file of the *whole* transform (initial alignment
composed with the deformable field; ``disp_FFFF_MMMM.nii.gz`` or the long name, when both file names follow the
Learn2Reg pattern and the grids allow, else a one-sentence note in ``metrics.json``), with ``export=("itk",)`` the
ITK/ANTs/Slicer transforms, ``metrics.json`` (paths, initial transform, metrics, timings) and ``config.json``
(the resolved settings). New output files belong here.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .. import io
from ..atomic import write_json_atomic
from ..errors import DinoregError
from ..evaluation.l2r_case import pair_outputs
from ..export_itk import export_itk
from ..outputs import OutputSet, strict_json
from .align import AlignedPair
from .evaluate import Metrics
from .displacement import Displacement


def prepare_out_dir(out: str | os.PathLike) -> Path:
    """Create ``out`` (with parents) and check it is writable, before any work is done; returns it as a Path."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DinoregError(f"The output folder {out} cannot be created ({e.strerror or e}).") from None
    if not os.access(out, os.W_OK):
        raise DinoregError(f"The output folder {out} is not writable.")
    return out


def write(out: str | os.PathLike, pair: AlignedPair, disp: Displacement, metrics: Metrics, *,
          config: dict | None = None, timings: dict | None = None, inputs=(), export=()) -> dict[str, str]:
    """Write the files of one registration into ``out`` (see the module docstring); returns {kind: path}.

    The set is staged and committed last by ``outputs.json`` (:class:`dinoreg_core.outputs.OutputSet`): a failure
    leaves ``out`` as it was; a reused ``out`` holds the new set as a whole. ``inputs``: further input paths (label
    maps) that no output may replace (the scans' own paths are always included). ``export``: further transform
    formats, ``("itk",)`` = the ITK/ANTs/Slicer files of :mod:`dinoreg_core.export_itk`."""
    out = prepare_out_dir(out)
    with OutputSet(out, inputs=[pair.fixed.path, pair.moving.path, *inputs]) as staged:
        return staged.commit(_write_files(staged.dir, pair, disp, metrics, config=config, timings=timings,
                                         export=tuple(export), final_dir=out))


def _write_files(out: Path, pair: AlignedPair, disp: Displacement, metrics: Metrics, *,
                 config: dict | None = None, timings: dict | None = None, export=(),
                 final_dir: Path | None = None) -> dict[str, Path]:
    """The files of one registration written into the folder ``out`` (the staging folder of ``final_dir``);
    returns {kind: path}."""
    f, moving = pair.fixed, pair.moving
    field = disp.numpy()
    files = {
        "displacement": io.save_displacement(field, f, out / "disp.nii.gz"),
        "warped": io.save_image(metrics.warped, f, out / "warped.nii.gz"),
    }
    if not np.allclose(pair.world_transform, np.eye(4)) or moving.shape != f.shape:
        files["moving_on_fixed"] = io.save_image(pair.moving_on_fixed, f, out / "moving_on_fixed_grid.nii.gz")
    if metrics.warped_labels is not None:
        files["warped_labels"] = io.save_labels(metrics.warped_labels, f, out / "warped_labels.nii.gz")
    l2r = pair_outputs(field, f, moving, pair.world_transform, out, moving_labels=pair.moving_labels,
                       fixed_labels=f.like(pair.fixed_labels) if pair.fixed_labels is not None else None,
                       moving_label_lut=pair.label_map)
    if l2r["file"]:
        files["l2r_displacement"] = Path(l2r["file"])
    final = final_dir or out
    metrics.learn2reg = {"file": str(final / Path(l2r["file"]).name) if l2r["file"] else None, "note": l2r["note"],
                         **(l2r["metrics"] or {})}
    if "itk" in export:
        files.update({k: Path(v) for k, v in export_itk(field, f, pair.world_transform, out).items()})
    payload = {"fixed": f.path, "moving": moving.path, "init_transform_fixed_world_to_moving_world":
               pair.world_transform.tolist(), "initial_alignment": pair.init_report, "metrics": metrics.to_dict(), "timings": dict(timings or {})}
    write_json_atomic(out / "metrics.json", strict_json(payload))  # strict JSON: null, never NaN
    write_json_atomic(out / "config.json", strict_json(dict(config or {})))
    files["metrics"] = out / "metrics.json"
    files["config"] = out / "config.json"
    return files
