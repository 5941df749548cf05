"""``dinoreg tune --method M --data DATASET --pairs N --out preset.json``: tune a method's registration preset
on tuning-cohort pairs (:mod:`dinoreg_core.evaluation.tune`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import DinoregError

log = logging.getLogger("dinoreg")


def add_parser(sub) -> None:
    from ..evaluation.tune import SEARCH_SPACE, TuneConfig

    d = TuneConfig()
    p = sub.add_parser(
        "tune", help="tune a method's registration preset on the tuning cohort",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=("Coordinate descent over ConvexAdam and feature settings of one method, on pairs of a *tuning*\n"
                     "cohort only (an evaluation or validation cohort is refused). Objective: mean Dice over the\n"
                     "pairs; a candidate whose mean SDlogJ or folding exceeds the guards is not admissible.\n"
                     "Resumable (OUT.log.jsonl holds every scored candidate); backbone features are stored in\n"
                     "OUT.cache/. Writes OUT, a preset file for `dinoreg register --preset OUT`."),
        epilog=("examples:\n"
                "  dinoreg tune --method mind --data synthetic --pairs 2 --out presets/mind_tuned.json\n"
                "  dinoreg tune --method dino3d --data runs/tuning/SynthTuning_dataset.json --pairs 1 \\\n"
                "      --params lambda_weight,feature_scale --out dino3d_tuned.json"))
    p.add_argument("--method", required=True, help="feature method to tune (mind, dino3d, intensity, ...)")
    p.add_argument("--data", default="synthetic",
                   help="'synthetic' (the tuning-role cohort, generated into --cohort-dir) or a tuning cohort's "
                        "*_dataset.json / folder")
    p.add_argument("--pairs", type=int, default=d.pairs_per_task, help="tuning pairs per task (default: %(default)s)")
    p.add_argument("--tasks", default=",".join(d.tasks), help="tasks, comma-separated (default: %(default)s)")
    p.add_argument("--params", default=",".join(d.params),
                   help=f"parameters searched, in order (default: %(default)s; known: {', '.join(SEARCH_SPACE)})")
    p.add_argument("--factors", help="factors tried for lambda_weight and feature_scale, comma-separated "
                                     "(default: 0.25,0.5,2,4)")
    p.add_argument("--starts", default=",".join(d.starts),
                   help="presets scored as starting points, those the method has (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="coordinate-descent passes (default: %(default)s)")
    p.add_argument("--max-sdlogj", type=float, default=d.max_sdlogj, help="guard on mean SDlogJ (default: %(default)s)")
    p.add_argument("--max-folding", type=float, default=d.max_folding_pct,
                   help="guard on mean %% folding (default: %(default)s)")
    p.add_argument("--cohort-dir", default="runs/tuning", help="where --data synthetic is generated")
    p.add_argument("--subjects", type=int, default=4, help="subjects of the generated tuning cohort (default: 4)")
    p.add_argument("--weights", help="dino3d weights held fixed during the search")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting held fixed during the search (repeatable)")
    p.add_argument("--cache", help="folder of stored backbone features (default: OUT.cache; may be shared)")
    p.add_argument("--out", required=True, help="the tuned preset file (.json)")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=run)


def _factors(text: str | None):
    if not text:
        return None
    try:
        out = tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise DinoregError(f"--factors {text!r} is not a comma-separated list of numbers.") from None
    if not out or not all(f > 0 and f == f and f != float("inf") for f in out):
        raise DinoregError(f"--factors {text!r} must be positive finite numbers.")
    return out


def run(args) -> int:
    from ..evaluation.tune import TuneConfig, tune
    from ..settings import parse_assignments

    if args.pairs < 1:
        raise DinoregError(f"--pairs {args.pairs} must be at least 1.")
    fixed = dict(parse_assignments(args.set))
    if args.weights:
        fixed["feat.weights"] = args.weights
    cfg = TuneConfig(method=args.method, starts=tuple(s for s in args.starts.split(",") if s), params=tuple(s for s in args.params.split(",") if s),
                     tasks=tuple(s for s in args.tasks.split(",") if s), rounds=args.rounds,
                     max_sdlogj=args.max_sdlogj, max_folding_pct=args.max_folding, pairs_per_task=args.pairs,
                     fixed_settings=fixed, device=args.device,
                     factors=_factors(args.factors), cache_dir=args.cache).validate()
    data = args.data
    if data == "synthetic":
        from ..data.cohorts import generate_role_cohort

        data = generate_role_cohort(Path(args.cohort_dir), "tuning", max(2, args.subjects), progress=True)
    res = tune(data, args.out, cfg)
    obj = res["objective"]
    print(f"tuned {args.method}: mean Dice {obj['dice']:.3f} (SDlogJ {obj['sdlogj']:.3f}, folding "
          f"{obj['folding_pct']:.3f} %) from the '{res['tuning']['start']}' preset")
    print("settings: " + ", ".join(f"{k}={v}" for k, v in res["settings"].items()))
    log.info(f"wrote {args.out} and {res['search_log']}")
    return 0
