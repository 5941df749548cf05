"""An independent re-implementation of the official Learn2Reg evaluation, to check our files and numbers.

Written from the documented behaviour of MDL-UzL/L2R ``evaluation/evaluation.py`` + ``utils.py`` (not a copy):

* pairs and metric list come from an evaluation config (``eval_pairs`` with ``fixed``/``moving`` paths relative to
  the data folder, ``evaluation_methods`` with ``metric`` in dice/hd95/sdlogj/tre and a ``labels`` list,
  ``expected_shape``, optional ``masked_evaluation``); :func:`config_from_dataset` builds one from a dataset.json;
* file name: subject = ``path[-16:-12]``, modality = ``path[-11:-7]``; ``disp_FFFF_MMMM`` is looked up when the
  modalities are equal or fixed 0000 <- moving 0001, else only ``disp_FFFF_ffff_MMMM_mmmm`` (missing = error);
* labels: ``images`` -> ``labels`` in the path; masks: ``images`` -> ``masks`` (fixed only);
* warped labels by ``scipy.ndimage.map_coordinates(order=0)`` at ``identity + field``;
* Jacobian: ``scipy.ndimage.correlate`` with [-0.5, 0, 0.5] along each axis (constant 0), + identity, cropped by
  2, determinant, + 3, clipped to [1e-9, 1e9], log, std (masked: ``numpy.ma`` with the fixed mask);
* Dice / HD95 per label: NaN when the label is absent from the fixed or the moving file; Dice of fixed vs warped
  (``surface_distance.compute_dice_coefficient``), HD95 ``compute_robust_hausdorff(compute_surface_distances(..,
  ones(3)), 95)``; mean = ``nanmean``;
* TRE: ``map_coordinates`` (order 3) of each field component at the fixed keypoints, norm of
  ``(fixed + u - moving) * spacing_moving``.

Usage::

    python bench/l2r_official_eval.py --submission SUB/ --dataset DATA/TASK_dataset.json --split registration_val \
        --out eval.json
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def config_from_dataset(dataset_json: Path, split: str, masked: bool = False) -> dict:
    """An evaluation config like the official ones, built from a Learn2Reg dataset.json."""
    d = json.loads(Path(dataset_json).read_text())
    labels = sorted(int(k) for k in (d.get("labels") or {}) if int(k) != 0)
    pairs = [{"fixed": p["fixed"].lstrip("./"), "moving": p["moving"].lstrip("./")} for p in d[split]]
    shape = list(nib.load(str(Path(dataset_json).parent / pairs[0]["fixed"])).shape[:3]) + [3]
    methods = [{"name": "LogJacDetStd", "metric": "sdlogj"}]
    if labels:
        methods += [{"name": "DSC", "metric": "dice", "labels": labels},
                    {"name": "HD95", "metric": "hd95", "labels": labels}]
    return {"task_name": d.get("name", "task"), "expected_shape": shape, "eval_pairs": pairs,
            "evaluation_methods": methods, "masked_evaluation": masked}


def _jacdet(field: np.ndarray) -> np.ndarray:
    """(D,H,W,3) field -> determinant of I + grad(u), central differences, cropped by 2."""
    k = np.array([-0.5, 0.0, 0.5])
    grads = np.empty((3, 3) + field.shape[:3])
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = 3
        for c in range(3):
            grads[axis, c] = ndimage.correlate(field[..., c], k.reshape(shape), mode="constant", cval=0.0)
    jac = grads + np.eye(3).reshape(3, 3, 1, 1, 1)
    jac = jac[:, :, 2:-2, 2:-2, 2:-2]
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def _sd():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import surface_distance
    return surface_distance


def _dice(fixed, moving, warped, labels):
    sd = _sd()
    out = []
    for i in labels:
        if (fixed == i).sum() == 0 or (moving == i).sum() == 0:
            out.append(np.nan)
        else:
            out.append(float(sd.compute_dice_coefficient(fixed == i, warped == i)))
    return float(np.nanmean(out)), out


def _hd95(fixed, moving, warped, labels):
    sd = _sd()
    out = []
    for i in labels:
        if (fixed == i).sum() == 0 or (moving == i).sum() == 0:
            out.append(np.nan)
        elif (warped == i).sum() == 0:
            out.append(np.inf)  # the package's answer (its np.Inf branch fails on NumPy 2)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out.append(float(sd.compute_robust_hausdorff(
                    sd.compute_surface_distances(fixed == i, warped == i, np.ones(3)), 95.0)))
    return float(np.nanmean(out)), out


def evaluate(submission: Path, data: Path, config: dict) -> dict:
    """Per-pair results keyed ``FFFF_ffff<--MMMM_mmmm``, like the official script's ``cases``."""
    cases = {}
    for pair in config["eval_pairs"]:
        fs, fm = pair["fixed"][-16:-12], pair["fixed"][-11:-7]
        ms, mm = pair["moving"][-16:-12], pair["moving"][-11:-7]
        short = fm == mm or (fm == "0000" and mm == "0001")
        name = f"disp_{fs}_{ms}.nii.gz" if short else f"disp_{fs}_{fm}_{ms}_{mm}.nii.gz"
        path = submission / name
        if not path.is_file():
            raise FileNotFoundError(f"missing {name}")
        field = nib.load(str(path)).get_fdata()
        if list(field.shape) != list(config["expected_shape"]):
            raise ValueError(f"{name} has shape {field.shape}, expected {config['expected_shape']}")
        res = {}
        metrics = [m["metric"] for m in config["evaluation_methods"]]
        if "dice" in metrics or "hd95" in metrics:
            fseg = nib.load(str(data / pair["fixed"].replace("images", "labels"))).get_fdata()
            mseg = nib.load(str(data / pair["moving"].replace("images", "labels"))).get_fdata()
            ident = np.stack(np.meshgrid(*[np.arange(s) for s in fseg.shape], indexing="ij"))
            wseg = ndimage.map_coordinates(mseg, ident + np.moveaxis(field, -1, 0), order=0)
        mask = None
        if config.get("masked_evaluation"):
            mp = data / pair["fixed"].replace("images", "masks")
            if mp.exists():
                mask = nib.load(str(mp)).get_fdata()
        for m in config["evaluation_methods"]:
            if m["metric"] == "sdlogj":
                logj = np.log(np.clip(_jacdet(field) + 3, 1e-9, 1e9))
                v = np.ma.MaskedArray(logj, 1 - mask[2:-2, 2:-2, 2:-2]).std() if mask is not None else logj.std()
                res[m["name"]] = float(v)
            elif m["metric"] == "dice":
                res[m["name"]], res[m["name"] + "_detailed"] = _dice(fseg, mseg, wseg, m["labels"])
            elif m["metric"] == "hd95":
                res[m["name"]], res[m["name"] + "_detailed"] = _hd95(fseg, mseg, wseg, m["labels"])
            elif m["metric"] == "tre":
                dest = m["dest"]
                if not short:
                    lo, hi = sorted([int(fm), int(mm)])
                    dest = f"{dest}{lo}{hi}"
                fk = np.loadtxt(data / pair["fixed"].replace("images", dest).replace(".nii.gz", ".csv"), delimiter=",")
                mk = np.loadtxt(data / pair["moving"].replace("images", dest).replace(".nii.gz", ".csv"), delimiter=",")
                sp = nib.load(str(data / pair["moving"])).header.get_zooms()[:3]
                u = np.stack([ndimage.map_coordinates(field[..., c], fk.T) for c in range(3)], axis=1)
                t = np.linalg.norm((fk + u - mk) * np.asarray(sp), axis=1)
                res[m["name"]] = float(t.mean())
        cases[f"{fs}_{fm}<--{ms}_{mm}"] = res
    return cases


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--submission", required=True, type=Path)
    ap.add_argument("--dataset", required=True, type=Path, help="TASK_dataset.json (its folder is the data folder)")
    ap.add_argument("--split", default="registration_val")
    ap.add_argument("--masked", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    cfg = config_from_dataset(a.dataset, a.split, a.masked)
    cases = evaluate(a.submission, a.dataset.parent, cfg)
    text = json.dumps(cases, indent=2)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
