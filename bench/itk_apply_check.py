"""Apply `dinoreg register --export itk` transforms with SimpleITK and antspyx and compare with warped.nii.gz.

Registers the real MR (LPS-stored, 20-slice slab) to the real CT (RAS) of ../shared/data/real with ``--init affine``
and writes a log (results/p15/itk_apply_log.md): the commands, and for each tool the largest difference to
``warped.nii.gz`` inside the moving field of view (as a fraction of the MR intensity range) and the share of
identical labels of ``warped_labels.nii.gz``.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/itk_apply_check.py --out results/p15
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import numpy as np

from dinoreg_core.cli import main as dinoreg
from dinoreg_core.demo import shared_data_dir
from dinoreg_core.export_itk import inside_moving_grid

ANTS_SCRIPT = """import sys, ants
f, m, ml, tx, o = sys.argv[1:6]
fi = ants.image_read(f)
ants.image_write(ants.apply_transforms(fi, ants.image_read(m), [tx], interpolator='linear'), o + '_img.nii.gz')
ants.image_write(ants.apply_transforms(fi, ants.image_read(ml), [tx], interpolator='nearestNeighbor'), o + '_lab.nii.gz')
"""


def _inside(sitk, fixed, composite_path, moving_path, tol=1e-6):
    return inside_moving_grid(sitk, fixed, composite_path, moving_path, tol)


def main(argv=None) -> int:
    import SimpleITK as sitk

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("results/p15"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/dinoreg_itk_apply"))
    ap.add_argument("--peers-python", default=str(Path(__file__).resolve().parents[1] / ".venv-peers/bin/python"))
    a = ap.parse_args(argv)
    real = shared_data_dir() / "real"
    fixed, moving = real / "ct_abdomen_pelvis.nii.gz", real / "mr_upper_abdomen.nii.gz"
    flab, mlab = real / "ct_abdomen_pelvis_labels.nii.gz", real / "mr_upper_abdomen_labels.nii.gz"
    reg = a.work / "reg"
    cmd = ["register", str(fixed), str(moving), "--fixed-labels", str(flab), "--moving-labels", str(mlab),
           "--label-map", str(real / "mr_label_ids_to_ct_label_ids.json"), "--init", "affine", "--export", "itk",
           "--out", str(reg)]
    t0 = time.time()
    assert dinoreg(cmd) == 0
    t_reg = time.time() - t0
    fx = sitk.ReadImage(str(fixed))
    mv = sitk.ReadImage(str(moving), sitk.sitkFloat32)
    ml = sitk.ReadImage(str(mlab))
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(reg / "warped.nii.gz")))
    comp = sitk.DisplacementFieldTransform(sitk.ReadImage(str(reg / "itk_composite.nii.gz"), sitk.sitkVectorFloat64))
    inside = _inside(sitk, fx, reg / "itk_composite.nii.gz", moving)
    rng = float(np.ptp(sitk.GetArrayFromImage(mv)))
    # warped_labels.nii.gz holds CT label ids (the label map applied); compare against the MR ids mapped the same way
    import json

    lut = {int(k): int(v["total_id"] if isinstance(v, dict) else v)
           for k, v in json.loads((real / "mr_label_ids_to_ct_label_ids.json").read_text()).items()}
    lut_arr = np.zeros(max(max(lut), 1000) + 1, np.int32)
    for k, v in lut.items():
        lut_arr[k] = v
    wl = sitk.GetArrayFromImage(sitk.ReadImage(str(reg / "warped_labels.nii.gz")))
    lines = [f"# Applying `dinoreg register --export itk` with other tools ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Registration (real MR slab, LPS, to real CT, RAS; --init affine): `dinoreg {' '.join(cmd)}` ({t_reg:.0f} s)",
             f"Fixed voxels whose transformed point falls between the MR's first and last voxel centres: "
             f"{100 * inside.mean():.1f}% (compared there; ITK extrapolates the border half-voxel, we do not)", "",
             "| tool | transform | max abs diff to warped.nii.gz (inside, % of MR range) | labels equal to warped_labels.nii.gz (inside) |",
             "| --- | --- | --- | --- |"]
    tx_two = sitk.CompositeTransform([sitk.ReadTransform(str(reg / "itk_initial_affine.tfm")),
                                      sitk.DisplacementFieldTransform(sitk.ReadImage(str(reg / "itk_deformable.nii.gz"),
                                                                                     sitk.sitkVectorFloat64))])
    for name, tx in (("itk_composite.nii.gz", comp), ("itk_initial_affine.tfm + itk_deformable.nii.gz", tx_two)):
        img = sitk.GetArrayFromImage(sitk.Resample(mv, fx, tx, sitk.sitkLinear, 0.0))
        lab = lut_arr[sitk.GetArrayFromImage(sitk.Resample(ml, fx, tx, sitk.sitkNearestNeighbor, 0))]
        lines.append(f"| SimpleITK {sitk.Version.VersionString()} | {name} | "
                     f"{100 * np.abs(img - warped)[inside].max() / rng:.4f} | {100 * (lab == wl)[inside].mean():.3f}% |")
    peers = Path(a.peers_python)
    if peers.exists():
        script = a.work / "apply_ants.py"
        script.write_text(ANTS_SCRIPT)
        r = subprocess.run([str(peers), str(script), str(fixed), str(moving), str(mlab), str(reg / "itk_composite.nii.gz"),
                            str(a.work / "ants")], capture_output=True, text=True)
        if r.returncode == 0:
            ai = sitk.GetArrayFromImage(sitk.ReadImage(str(a.work / "ants_img.nii.gz")))
            al = lut_arr[np.rint(sitk.GetArrayFromImage(sitk.ReadImage(str(a.work / "ants_lab.nii.gz")))).astype(int)]
            lines.append(f"| antspyx 0.6.3 `ants.apply_transforms(fixed, moving, ['itk_composite.nii.gz'])` | "
                         f"itk_composite.nii.gz | {100 * np.abs(ai - warped)[inside].max() / rng:.4f} | "
                         f"{100 * (al == wl)[inside].mean():.3f}% |")
        else:
            lines.append(f"| antspyx | failed: {r.stderr.strip().splitlines()[-1]} | | |")
    else:
        lines.append("| antspyx | not installed (make peers-env) | | |")
    m = json.loads((reg / "metrics.json").read_text())["metrics"]
    lines += ["", f"Learn2Reg file: {m['learn2reg']['note'] or m['learn2reg']['file']}", ""]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "itk_apply_log.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
