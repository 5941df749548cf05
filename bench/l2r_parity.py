"""Our Learn2Reg numbers against the official evaluation's rules, side by side (results/p15/).

Makes a small synthetic Learn2Reg-layout cohort (CT-CT pairs, paired MR-CT pairs, one CT <- MR pair with the long
file name, label-centroid keypoints), runs ``dinoreg l2r`` with ``--init affine`` on each split, evaluates the
submission folders with ``bench/l2r_official_eval.py`` (an independent re-implementation of the official script)
and writes a table of: the official-rule numbers, ``metrics_l2r.csv``, the ``learn2reg`` block of each pair's
``metrics.json`` and the pipeline's own ``summary`` / ``field`` numbers.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/l2r_parity.py --out results/p15
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
import l2r_official_eval as official  # noqa: E402

from dinoreg_core.cli import main as dinoreg  # noqa: E402
from dinoreg_core.data.phantom import PhantomConfig, generate_cohort  # noqa: E402

SPLITS = {"registration_val": "CT-CT", "registration_mrct": "CT <- MR (short name, 0000 <- 0001)",
          "registration_crossmodal": "MR <- CT (long name)"}


def make_cohort(root: Path) -> Path:
    cfg = PhantomConfig(n_subjects=3, spacing_mm=4.0, shape=(72, 60, 64), seed=7, mr_subjects=(1, 3),
                        n_val_subjects=3, workers=1)
    jp = generate_cohort(root, cfg, progress=False)
    d = json.loads(jp.read_text())
    d["registration_crossmodal"] = [{"fixed": "./imagesTr/SynthAbdomen_0003_0001.nii.gz",
                                     "moving": "./imagesTr/SynthAbdomen_0001_0000.nii.gz"}]
    jp.write_text(json.dumps(d, indent=2))
    (root / "keypointsTr").mkdir(exist_ok=True)
    for f in sorted((root / "labelsTr").glob("*_0000.nii.gz")):  # CT-CT keypoints: organ centroids (voxels)
        lab = np.asarray(nib.load(str(f)).dataobj)
        c = np.array(ndimage.center_of_mass(lab > 0, lab, list(range(1, 14))))
        np.savetxt(root / "keypointsTr" / f.name.replace(".nii.gz", ".csv"), c, delimiter=",", fmt="%.3f")
    return jp


def make_real_pair(root: Path) -> Path | None:
    """A real-anatomy CT-CT pair in Learn2Reg layout: the real CT and the demo's known deformation of it, the moving
    file stored LPS with its origin moved by 15 mm (so --init affine has work to do). None without ../shared."""
    from dinoreg_core.demo import find_demo_ct, known_deformation_pair

    ct, _ = find_demo_ct()
    if ct is None:
        return None
    pair = known_deformation_pair(max_disp_mm=10.0, seed=0, ct_path=ct)
    for d in ("imagesTr", "labelsTr"):
        (root / d).mkdir(parents=True, exist_ok=True)
    f = pair.fixed
    flip = np.array([[-1, 0, 0, f.shape[0] - 1], [0, -1, 0, f.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    maff = f.affine @ flip
    maff[:3, 3] += (15.0, -10.0, 5.0)
    nib.save(nib.Nifti1Image(f.array, f.affine), str(root / "imagesTr/RealCT_0001_0000.nii.gz"))
    nib.save(nib.Nifti1Image(pair.fixed_labels.array.astype(np.int16), f.affine), str(root / "labelsTr/RealCT_0001_0000.nii.gz"))
    nib.save(nib.Nifti1Image(pair.moving.array[::-1, ::-1].copy(), maff), str(root / "imagesTr/RealCT_0002_0000.nii.gz"))
    nib.save(nib.Nifti1Image(pair.moving_labels.array[::-1, ::-1].astype(np.int16).copy(), maff),
             str(root / "labelsTr/RealCT_0002_0000.nii.gz"))
    jp = root / "RealCT_dataset.json"
    jp.write_text(json.dumps({"name": "RealCT", "labels": {"0": "background", **{str(k): v for k, v in pair.label_names.items()}},
                              "registration_val": [{"fixed": "./imagesTr/RealCT_0001_0000.nii.gz",
                                                    "moving": "./imagesTr/RealCT_0002_0000.nii.gz"}]}))
    return jp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("results/p15"))
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default OUT/l2r_parity_work)")
    a = ap.parse_args(argv)
    work = a.work or a.out / "l2r_parity_work"
    work.mkdir(parents=True, exist_ok=True)
    jp = make_cohort(work / "cohort")
    rows = []
    t0 = time.time()
    jobs = [(jp, split, what) for split, what in SPLITS.items()]
    real = make_real_pair(work / "real")
    if real is not None:
        jobs.append((real, "registration_val", "real CT <- real CT warped (LPS-stored, origin moved 15 mm)"))
    for jp, split, what in jobs:
        sub = work / f"sub_{jp.stem}_{split}"
        rc = dinoreg(["l2r", str(jp), "--split", split, "--out", str(sub), "--init", "affine", "--masked"])
        assert rc == 0
        cfg = official.config_from_dataset(jp, split, masked=True)
        if split == "registration_val" and jp.parent.name == "cohort":
            cfg["evaluation_methods"].append({"name": "TRE", "metric": "tre", "dest": "keypoints"})
        ref = official.evaluate(sub, jp.parent, cfg)
        ref_unmasked = official.evaluate(sub, jp.parent, {**cfg, "masked_evaluation": False})
        ours = pd.read_csv(sub / "metrics_l2r.csv").set_index("pair")
        for key, o in ref.items():
            m = json.loads((sub / "pairs" / key.replace("<--", "-") / "metrics.json").read_text())["metrics"]
            l2r = m["learn2reg"]
            rows.append({"split": f"{jp.stem.replace('_dataset', '')}:{split}", "pair": key, "kind": what, "file": ours.loc[key, "file"],
                         "dice_official": o["DSC"], "dice_table": ours.loc[key, "dice"], "dice_metrics_json": l2r["dice"],
                         "dice_pipeline": m["summary"]["dice"],
                         "hd95_official": o["HD95"], "hd95_table": ours.loc[key, "hd95"], "hd95_metrics_json": l2r["hd95"],
                         "hd95_vox_pipeline": m["summary"]["hd95_vox"],
                         "sdlogj_masked_official": o["LogJacDetStd"], "sdlogj_masked_table": ours.loc[key, "sdlogj"],
                         "sdlogj_official": ref_unmasked[key]["LogJacDetStd"], "sdlogj_metrics_json": l2r["sdlogj"],
                         "sdlogj_l2r_deformable_only": m["field"]["sdlogj_l2r"],
                         "tre_official": o.get("TRE"), "tre_table": ours.loc[key].get("tre") if "tre" in ours else None,
                         "tre_metrics_json": l2r.get("tre")})
    df = pd.DataFrame(rows)
    a.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(a.out / "l2r_parity.csv", index=False)
    diff = {f"{k}: official - {src}": float(np.nanmax(np.abs(df[f"{k}_official"].astype(float)
                                                               - df[f"{k}_{src}"].astype(float))))
            for k in ("dice", "hd95", "sdlogj", "sdlogj_masked", "tre") for src in ("table", "metrics_json")
            if f"{k}_{src}" in df and df[f"{k}_{src}"].notna().any()}
    with open(a.out / "l2r_parity.md", "w") as f:
        f.write(f"# Learn2Reg numbers: official rules vs ours ({time.strftime('%Y-%m-%d %H:%M')}, "
                f"{platform.node()}, OMP_NUM_THREADS=1, {time.time() - t0:.0f} s)\n\n")
        f.write("Command: `PYTHONPATH=. OMP_NUM_THREADS=1 python bench/l2r_parity.py --out results/p15` "
                "(`dinoreg l2r ... --init affine --masked` per split; official = bench/l2r_official_eval.py).\n\n")
        f.write(df.to_markdown(index=False, floatfmt=".6f") + "\n\n")
        f.write("metrics.json's `learn2reg` block is unmasked (register has no mask input); metrics_l2r.csv (the "
                "`dinoreg l2r` table) uses the fixed masks with --masked.\n\n")
        f.write(f"Largest absolute differences over all pairs: {json.dumps(diff, indent=1)}\n")
    print(df.to_string())
    print(diff)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
