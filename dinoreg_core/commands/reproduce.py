"""``dinoreg reproduce``: run the notebook suite 01 -> 04 with papermill, resumably.

    dinoreg reproduce --profile demo|paper|PROFILE.json [--out DIR] [--run-id ID] [--set [NN.]KEY=VALUE ...]

``demo``: the synthetic cohort, the shipped 3D DINO demo weights (or, when they are missing, a short CPU
pretraining first), CT-CT and MR-CT pairs, methods intensity / mind / dino3d; about 15-20 min on 2 CPU cores.
``paper``: the Learn2Reg AbdomenCTCT and AbdomenMRCT data (``dinoreg data fetch``), the paper's model config,
on a GPU. Executed notebooks go to ``DIR/runs/ID/``, figures to ``DIR/figures/ID/``, tables to
``DIR/tables/ID/`` (see dinoreg_core/reproduce.py). Rerunning skips the steps already finished with the same
parameters.
"""

from __future__ import annotations


def add_parser(subparsers) -> None:
    from ..reproduce import profile_names

    import argparse

    p = subparsers.add_parser("reproduce", help="run the notebooks 01-04 (papermill) for a profile, resumably",
                              description=__doc__.replace("``", "").split("\n\n", 1)[1],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="demo",
                   help=f"profile name ({', '.join(profile_names())}) or a profile JSON file (default: demo)")
    p.add_argument("--out", default="results", help="results folder (default: results)")
    p.add_argument("--run-id", default=None, help="run name under OUT/runs, OUT/figures, OUT/tables (default: the profile name)")
    p.add_argument("--set", action="append", default=[], metavar="[NN.]KEY=VALUE",
                   help="override a notebook parameter (all notebooks having it, or notebook NN only); JSON values")
    p.add_argument("--kernel", default="python3", help="Jupyter kernel (default python3 = this Python)")
    p.add_argument("--fresh", action="store_true", help="after the checks, delete the folders this run wrote before (only those, only inside --out) and run every step")
    p.add_argument("--force", action="store_true", help="run every step even if finished (keeps the data)")
    p.add_argument("--log-output", action="store_true", help="echo the notebooks' cell output while they run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..reproduce import print_summary, reproduce

    s = reproduce(args.profile, out=args.out, run_id=args.run_id, sets=args.set, kernel=args.kernel,
                  progress=not args.no_progress, log_output=args.log_output, force=args.force, fresh=args.fresh)
    print_summary(s)
    return 0
