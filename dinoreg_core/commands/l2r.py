"""``dinoreg l2r DATASET.json --split registration_val --out SUBMISSION/``: a complete Learn2Reg submission."""

from __future__ import annotations

import argparse

from ..features.registry import available_feature_methods


def add_parser(sub) -> None:
    p = sub.add_parser(
        "l2r", help="register every pair of a Learn2Reg split into a submission folder (+ .zip, metrics)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Register every pair of --split of a Learn2Reg dataset and write the submission folder: one\n"
            "disp_FFFF_MMMM.nii.gz (or disp_FFFF_ffff_MMMM_mmmm.nii.gz, as the official evaluation expects) per pair,\n"
            "holding the whole transform (initial alignment + deformable) in fixed voxels; then submission.zip and,\n"
            "when the dataset has labels or keypoints, metrics_l2r.csv with the official evaluation's rules.\n"
            "Resumable: a pair whose file exists is skipped. Shardable: under torchrun each process takes every\n"
            "WORLD_SIZE-th pair; rerun with one process (or let rank 0 finish last) to write the zip and the table."),
        epilog="example:\n  dinoreg l2r AbdomenCTCT/AbdomenCTCT_dataset.json --split registration_val --out sub --init affine")
    p.add_argument("dataset", help="the task's *_dataset.json (or its folder)")
    p.add_argument("--split", default="registration_val", help="pair list of the dataset.json (default registration_val)")
    p.add_argument("--out", required=True, help="submission folder (created)")
    p.add_argument("--features", default="mind", help=f"feature method: {', '.join(available_feature_methods())}")
    p.add_argument("--weights", help="weights file for learned features")
    p.add_argument("--init", default="none", choices=["none", "com", "affine"], help="initial alignment (default none)")
    p.add_argument("--masked", action="store_true", help="SDlogJ inside the fixed masks (AbdomenMRCT's rule)")
    p.add_argument("--no-zip", action="store_true", help="do not write submission.zip")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda: cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--preset", default="default", metavar="NAME|PATH",
                   help="registration preset: official, authors, tuned, tuned_2mm or a preset JSON (default: the method's default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting (see register)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import method_config
    from ..pipeline.checks import check_register_config
    from ..settings import parse_assignments
    from ..evaluation.l2r_submission import run_submission
    from ..evaluation.shard import world_from_env

    rank, world, local = world_from_env()
    device = f"cuda:{local}" if args.device == "cuda" and world > 1 else args.device
    overrides = ([("feat.weights", args.weights)] if args.weights else []) + parse_assignments(args.set)
    cfg = method_config(args.features, overrides, preset=args.preset, init=args.init, device=device)
    check_register_config(cfg)
    r = run_submission(args.dataset, args.split, args.out, config=cfg, masked=args.masked, rank=rank, world=world,
                       make_zip=not args.no_zip)
    print(f"{r['done']}/{r['total']} pairs in {args.out} ({r['skipped']} already there)")
    if r["table"]:
        import pandas as pd

        t = pd.read_csv(r["table"])
        cols = [c for c in ("pair", "dice", "hd95", "sdlogj", "tre") if c in t.columns]
        print(t[cols].to_string(index=False))
        print(f"table: {r['table']}" + (f"; zip: {r['zip']}" if r["zip"] else ""))
    return 0
