"""Montage of the synthetic cohort beside the real CT and MR (../shared/data/real), all at the same scale.

Columns: the real scan, then three subjects of the demo cohort (default config, seed 0; cases with an MR).
Rows: CT axial (soft-tissue window), CT axial with the 13 Learn2Reg labels, CT coronal with labels, MR axial,
MR coronal. Axial slices are shown radiologically (patient's right on the image's left, anterior up), coronal
slices with superior up; every panel spans the same millimetres, so sizes compare directly.

    .venv/bin/python bench/phantom_montage.py [--cases 1 3 5] [--out results/figures/phantom_montage.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from dinoreg_core.atomic import atomic_path  # noqa: E402
from dinoreg_core.data.phantom import LABELS, PhantomConfig, generate_subject, subject_seed  # noqa: E402
from dinoreg_core.io import load_labels, load_volume  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / ".." / "shared" / "data" / "real"
# TotalSegmentator "total" ids -> Learn2Reg AbdomenCTCT ids (the real CT's labels)
TS_TO_L2R = {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13}
# TotalSegmentator "total_mr" ids -> Learn2Reg ids (the real MR's labels)
TSMR_TO_L2R = {1: 1, 2: 2, 3: 3, 4: 4, 5: 6, 6: 7, 23: 8, 24: 9, 25: 10, 7: 11, 8: 12, 9: 13}
COLORS = ListedColormap(plt.get_cmap("tab20")(np.linspace(0, 1, 20))[[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3, 5]])
VIEW_MM = (400.0, 320.0)  # width x height of every axial panel (mm); coronal: 400 x 340


def _map_labels(lab: np.ndarray, table: dict) -> np.ndarray:
    out = np.zeros_like(lab, dtype=np.int32)
    for src, dst in table.items():
        out[lab == src] = dst
    return out


def _axial(a, k):
    """(rows=anterior..posterior, cols=patient right..left) slice of a canonical RAS array."""
    return a[:, :, k].T[::-1, ::-1]


def _coronal(a, j):
    """(rows=superior..inferior, cols=patient right..left) slice of a canonical RAS array."""
    return a[:, j, :].T[::-1, ::-1]


def _show(ax, img, sp, view, *, window=None, labels=None, title=None):
    h, w = img.shape
    extent = (-w * sp[0] / 2, w * sp[0] / 2, -h * sp[1] / 2, h * sp[1] / 2)
    if window == "ct":
        ax.imshow(np.clip(img, -160, 240), cmap="gray", vmin=-160, vmax=240, extent=extent, interpolation="nearest")
    else:
        hi = np.percentile(img, 99.5) if img.size else 1.0
        ax.imshow(img, cmap="gray", vmin=0, vmax=hi, extent=extent, interpolation="nearest")
    if labels is not None:
        ax.imshow(np.ma.masked_equal(labels, 0), cmap=COLORS, vmin=0.5, vmax=13.5, alpha=0.45, extent=extent,
                  interpolation="nearest")
    ax.set_xlim(-view[0] / 2, view[0] / 2)
    ax.set_ylim(-view[1] / 2, view[1] / 2)
    ax.set_facecolor("black")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)


def _level(lab: np.ndarray, ids) -> tuple[int, int]:
    """Axial index through the kidneys' centre and coronal index through the kidneys / aorta."""
    m = np.isin(lab, list(ids))
    c = np.argwhere(m).mean(0)
    return int(round(c[2])), int(round(c[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, nargs="+", default=[1, 3, 5], help="demo-cohort cases (need an MR)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "figures" / "phantom_montage.png")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = PhantomConfig()
    mr_cases = cfg.mr_cases()
    contrasts = {c: cfg.mr_contrasts[i % len(cfg.mr_contrasts)] for i, c in enumerate(mr_cases)}
    cols = []
    have_real = (REAL / "ct_abdomen_pelvis.nii.gz").exists()
    if have_real:
        ct = load_volume(REAL / "ct_abdomen_pelvis.nii.gz")
        ctl = _map_labels(load_labels(REAL / "ct_abdomen_pelvis_labels.nii.gz").array, TS_TO_L2R)
        mr = load_volume(REAL / "mr_upper_abdomen.nii.gz")
        mrl = _map_labels(load_labels(REAL / "mr_upper_abdomen_labels.nii.gz").array, TSMR_TO_L2R)
        cols.append(dict(title="real", ct=ct.array, lab=ctl, sp=ct.spacing, mr=mr.array, mrlab=mrl, mrsp=mr.spacing,
                         ct_note="real CT (TotalSegmentator test case)", mr_note="real MR (another person)"))
    for case in args.cases:
        con = contrasts.get(case, "t1")
        s = generate_subject(subject_seed(cfg.seed, case), cfg, with_mr=True, mr_contrast=con)
        sp = (cfg.spacing_mm,) * 3
        cols.append(dict(title=f"synthetic case {case}", ct=s["ct"], lab=s["labels"], sp=sp, mr=s["mr"],
                         mrlab=s["mr_labels"], mrsp=sp, ct_note=f"case {case}: CT {s['meta']['ct_phase']}",
                         mr_note=f"case {case}: MR {con.upper()}-like"))
    rows = ["CT axial", "CT axial + labels", "CT coronal + labels", "MR axial + labels", "MR coronal"]
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(3.2 * len(cols), 2.75 * len(rows)), facecolor="black")
    axes = np.atleast_2d(axes)
    for c, col in enumerate(cols):
        k, j = _level(col["lab"], (2, 3))
        sp = col["sp"]
        _show(axes[0, c], _axial(col["ct"], k), (sp[0], sp[1]), VIEW_MM, window="ct", title=col["ct_note"])
        _show(axes[1, c], _axial(col["ct"], k), (sp[0], sp[1]), VIEW_MM, window="ct", labels=_axial(col["lab"], k))
        jc = int(round(np.argwhere(np.isin(col["lab"], [2, 3, 8])).mean(0)[1]))
        _show(axes[2, c], _coronal(col["ct"], jc), (sp[0], sp[2]), (400.0, 340.0), window="ct",
              labels=_coronal(col["lab"], jc))
        msp = col["mrsp"]
        ids = (6, 1) if col["title"] == "real" else (2, 3)
        km = int(round(np.argwhere(np.isin(col["mrlab"], ids)).mean(0)[2])) if np.isin(col["mrlab"], ids).any() \
            else col["mr"].shape[2] // 2
        _show(axes[3, c], _axial(col["mr"], km), (msp[0], msp[1]), VIEW_MM, labels=_axial(col["mrlab"], km),
              title=col["mr_note"])
        jm = int(round(np.argwhere(np.isin(col["mrlab"], [6, 1, 2, 3])).mean(0)[1]))
        _show(axes[4, c], _coronal(col["mr"], jm), (msp[0], msp[2]), (400.0, 340.0))
    for r, name in enumerate(rows):
        axes[r, 0].set_ylabel(name, color="white", fontsize=9)
    for ax in axes.flat:
        ax.title.set_color("white")
    handles = [plt.Rectangle((0, 0), 1, 1, color=COLORS(i - 1)) for i in LABELS]
    fig.legend(handles, [f"{i} {n}" for i, n in LABELS.items()], loc="lower center", ncol=7, fontsize=7,
               facecolor="black", labelcolor="white", frameon=False)
    fig.suptitle("Synthetic abdominal CT/MR cohort (dinoreg phantom, 3 mm) beside real scans - same scale, "
                 "patient's right on the left", color="white", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out) as tmp:
        fig.savefig(tmp, dpi=110, facecolor="black", format="png")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
