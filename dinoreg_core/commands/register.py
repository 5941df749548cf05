"""``dinoreg register FIXED MOVING ...``: register two NIfTI scans and write the results."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..pipeline import available_registration_methods
from .common import print_label_table, print_result_summary


def add_parser(sub) -> None:
    p = sub.add_parser(
        "register", help="register a moving scan to a fixed scan",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Register MOVING to FIXED with dense features and ConvexAdam (no labels or training needed).\n\n"
            "Writes into --out: disp.nii.gz (displacement on the fixed grid, (D,H,W,3) in fixed voxels, backward:\n"
            "warped(x) = moving(x + disp(x)), in the fixed file's own voxel axes; the deformable part), the Learn2Reg\n"
            "file disp_FFFF_MMMM.nii.gz (the whole transform, initial alignment included, indexing the moving file's\n"
            "grid; written when the names follow the Learn2Reg pattern and both files share one grid), warped.nii.gz,\n"
            "warped_labels.nii.gz (with --moving-labels), metrics.json and config.json; with --export itk also\n"
            "itk_composite.nii.gz etc. for ITK/ANTs/Slicer; then outputs.json last (the files and their SHA-256:\n"
            "present = the set is complete). Outputs are in the fixed scan's orientation; a reused --out holds the\n"
            "new set as a whole (the old set's other files are removed, files of yours are kept)."),
        epilog=("examples:\n"
                "  dinoreg register fixed.nii.gz moving.nii.gz --out result\n"
                "  dinoreg register ct.nii.gz mr.nii.gz --fixed-labels ct_seg.nii.gz --moving-labels mr_seg.nii.gz \\\n"
                "      --init affine --label-map mr_label_ids_to_ct_label_ids.json --set lambda_weight=2"))
    p.add_argument("fixed", help="fixed scan (.nii or .nii.gz)")
    p.add_argument("moving", help="moving scan (.nii or .nii.gz), warped onto the fixed scan")
    p.add_argument("--fixed-labels", help="label map of the fixed scan (same grid), for Dice/HD95")
    p.add_argument("--moving-labels", help="label map of the moving scan (same grid), warped and evaluated")
    p.add_argument("--label-map", help="JSON mapping moving label ids to fixed label ids "
                                       "({\"5\": 5} or {\"5\": {\"total_id\": 5}}); unmapped ids are ignored")
    p.add_argument("--features", default="mind",
                   help=f"registration method: {', '.join(available_registration_methods())} (default: mind; peers "
                        f"take their own options as feat.NAME=VALUE)")
    p.add_argument("--weights", help="weights file for learned features (dino3d: .safetensors; dinov2: folder, hub id or .pth)")
    p.add_argument("--init", default="none", choices=["none", "com", "affine"],
                   help="initial alignment when world coordinates are unrelated: none (trust the headers), com "
                        "(body centres of mass), affine (MIND translation search + affine fit); default none")
    p.add_argument("--fixed-modality", choices=["ct", "mr"], help="modality of FIXED (default: guessed from intensities)")
    p.add_argument("--moving-modality", choices=["ct", "mr"], help="modality of MOVING (default: guessed)")
    p.add_argument("--out", default="dinoreg_out", help="output folder (created; default: dinoreg_out)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--preset", default="default", metavar="NAME|PATH",
                   help="the method's registration settings to start from: official (the official ConvexAdam MIND "
                        "defaults), authors (the seed paper's published settings), tuned (found by `dinoreg tune` at 3 mm), "
                        "tuned_2mm (the same search at 2 mm; mind, dino3d, dino3d+mind, intensity) or a preset JSON file; default: the method's default preset (see dinoreg_core/presets/)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting on top of the preset, repeatable: ConvexAdam (grid_sp=6, disp_hw=4, lambda_weight=1.25, "
                        "iterations=80, grid_sp_adam=2, ic=true, final_smooth=0, lr=1.0), pca_dim=12, feature_scale=1, seed=0, "
                        "or a "
                        "feature option as feat.NAME=VALUE (e.g. feat.mind_r=1 feat.mind_d=2)")
    p.add_argument("--export", action="append", default=[], choices=["itk"],
                   help="also write transforms for other tools: itk = itk_composite.nii.gz (whole transform, one "
                        "displacement field), itk_deformable.nii.gz and itk_initial_affine.tfm/.mat for ITK, ANTs, Slicer")
    p.add_argument("--json", action="store_true", help="print metrics.json to stdout instead of tables")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import method_config, register
    from ..labels import load_label_id_map
    from ..settings import parse_assignments
    from ..pipeline.checks import check_register_config, check_weights_apply

    if args.weights:
        check_weights_apply(args.features, args.weights)
    overrides = ([("feat.weights", args.weights)] if args.weights else []) + parse_assignments(args.set)
    cfg = method_config(args.features, overrides, preset=args.preset, init=args.init, device=args.device,
                        fixed_modality=args.fixed_modality, moving_modality=args.moving_modality)
    check_register_config(cfg)
    label_map = load_label_id_map(args.label_map) if args.label_map else None  # validated, one sentence
    if args.json:
        logging.getLogger("dinoreg").setLevel(logging.WARNING)  # stdout carries the JSON only
    res = register(args.fixed, args.moving, fixed_labels=args.fixed_labels, moving_labels=args.moving_labels,
                   config=cfg, out_dir=args.out, label_map=label_map, export=tuple(args.export))
    if args.json:
        print(Path(res.outputs["metrics"]).read_text())
        return 0
    if "labels" in res.metrics:
        print_label_table(res.metrics["labels"])
    print_result_summary(res)
    return 0
