"""``dinoreg pretrain``: DINO/iBOT pretraining of the 3D ViT on unlabeled CT and MR.

    dinoreg pretrain --config CFG --data DIR --out RUN_DIR [--resume] [--set KEY=VALUE ...]

``CFG`` is a JSON (or YAML) file of :class:`dinoreg_core.ssl.train.PretrainConfig` fields, or the name of a
config shipped with the package (``demo`` = ``dinoreg_core/configs/pretrain_demo.json``). ``DIR`` is a corpus
folder (``dinoreg data build-corpus``), a folder of NIfTI scans, or a Learn2Reg dataset (folder or json).
With ``--resume`` the run continues from ``RUN_DIR/checkpoint.pt`` (config: ``RUN_DIR/config.json`` unless
``--config`` is given; ``--set`` still applies, e.g. ``--set steps=20000`` to extend a run).

Several processes: ``torchrun --nproc_per_node N -m dinoreg_core.cli pretrain ...`` (``batch_size`` is global).
"""

from __future__ import annotations

from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pretrain", help="DINO/iBOT pretraining of the 3D ViT backbone",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, help="config JSON/YAML file or packaged name (e.g. demo)")
    p.add_argument("--data", required=True, help="corpus folder, folder of NIfTI scans or Learn2Reg dataset")
    p.add_argument("--out", required=True, help="run folder (config.json, checkpoint.pt, log.csv, exported weights)")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (dotted for nested fields, e.g. augment.global_size=32)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..ssl import dist
    from ..ssl.train import load_config, resolve_config_path, train
    from ..validate import check_pretrain_config

    out = Path(args.out)
    cfg_path = resolve_config_path(args.config, out, args.resume)
    overrides = list(args.set) + (["progress=false"] if args.no_progress else [])
    cfg = load_config(cfg_path, overrides)
    check_pretrain_config(cfg)
    try:
        res = train(cfg, args.data, out, resume=args.resume)
    finally:
        dist.cleanup()
    if res["rank"] != 0:
        return 0
    if res.get("skipped_scans"):
        n = len(res["skipped_scans"])
        print(f"skipped {n} damaged scan{'s' if n > 1 else ''}: " + ", ".join(res["skipped_scans"]))
    if "export" in res:
        print(f"exported teacher backbone: {res['export']}")
    else:
        print(f"stopped at step {res['step']} of {cfg.steps}; continue with --resume")
    return 0
