"""Run the evaluation protocol (dinoreg_core.evaluation.protocol) and write its tables into results/.

    PYTHONPATH=. OMP_NUM_THREADS=1 nice python bench/protocol.py --spacing 3 --pairs 10 --out results/protocol/3mm \
        --real ../shared/data/real

Resumable: rerun the same command to continue; what finished is in OUT/rows.csv and the tables are rewritten from
it. ``--tables-only`` rewrites the tables from rows.csv without registering anything.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from dinoreg_core.cli import setup_logging
from dinoreg_core.errors import DinoregError
from dinoreg_core.evaluation.protocol import ProtocolConfig, run_protocol, write_tables


def main(argv=None) -> int:
    d = ProtocolConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--spacing", type=float, default=d.spacing_mm)
    p.add_argument("--pairs", type=int, default=d.pairs_per_task)
    p.add_argument("--subjects", type=int, default=d.n_subjects)
    p.add_argument("--methods", default=",".join(d.methods))
    p.add_argument("--presets", default=",".join(d.presets))
    p.add_argument("--tasks", default=",".join(d.tasks), help="cohort tasks ('' with --real: the real pair only)")
    p.add_argument("--cohort", help="an existing evaluation cohort (json or folder)")
    p.add_argument("--real", help="folder of the real MR/CT pair (extra row)")
    p.add_argument("--cache", help="folder of the stored backbone features (default: OUT/feature_cache)")
    p.add_argument("--no-hd95", action="store_true", help="skip HD95 (faster)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="a setting of one method on top of every preset (repeatable), "
                        "e.g. dino3d:feat.weights=W.safetensors")
    p.add_argument("--tag", default="", help="name the rows method@TAG[preset] (e.g. other weights)")
    p.add_argument("--rename", action="append", default=[], metavar="OLD=NEW",
                   help="with --merge: name the rows OLD as NEW in the merged rows (repeatable; all at once, so two "
                        "names can be swapped), e.g. when a default changed and a tag now names the old behaviour")
    p.add_argument("--tables-only", action="store_true")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="with --tables-only: first combine the rows.csv of these protocol folders into OUT/rows.csv "
                        "(one row per dataset, pair, method and label; the first folder wins)")
    a = p.parse_args(argv)
    setup_logging(0)
    renames: dict = {}
    for item in a.rename:
        old, sep, new = item.partition("=")
        if not (sep and old and new) or not a.merge:
            print(f"protocol: error: --rename {item!r} is not OLD=NEW used with --merge.", file=sys.stderr)
            return 2
        renames[old] = new
    method_settings: dict = {}
    for item in a.set:
        head, sep, value = item.partition("=")
        method, colon, key = head.partition(":")
        if not (sep and colon and method and key):
            print(f"protocol: error: --set {item!r} is not METHOD:KEY=VALUE.", file=sys.stderr)
            return 2
        method_settings.setdefault(method, {})[key] = value
    cfg = ProtocolConfig(methods=tuple(a.methods.split(",")), presets=tuple(a.presets.split(",")),
                         tasks=tuple(t for t in a.tasks.split(",") if t), pairs_per_task=a.pairs, spacing_mm=a.spacing,
                         n_subjects=a.subjects, cohort=a.cohort, real_pair=a.real, hd95=not a.no_hd95, cache_dir=a.cache,
                         method_settings=method_settings, tag=a.tag)
    try:
        if a.tables_only and a.merge:
            parts = [pd.read_csv(Path(d) / "rows.csv") for d in a.merge if (Path(d) / "rows.csv").is_file()]
            rows = pd.concat(parts, ignore_index=True)
            rows["method"] = rows["method"].map(lambda m: renames.get(m, m))
            rows = rows.drop_duplicates(["dataset", "pair", "method", "label"])
            Path(a.out).mkdir(parents=True, exist_ok=True)
            rows.to_csv(Path(a.out) / "rows.csv", index=False, float_format="%.6g")
        if a.tables_only:
            files = write_tables(Path(a.out), pd.read_csv(Path(a.out) / "rows.csv"), cfg.presets,
                                 f"Evaluation protocol ({a.spacing:g} mm)")
        else:
            files = run_protocol(a.out, cfg)
    except DinoregError as e:
        print("protocol: error: " + str(e), file=sys.stderr)
        return 2
    logging.getLogger("dinoreg").info("wrote " + ", ".join(str(v["md"]) for v in files.values()))
    print(Path(files["results"]["md"]).read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
