"""``dinoreg demo``: the main job on embedded data — recover a known deformation of a real CT.

Aligns the pair once, then runs every requested method on it through the pipeline's stages
(:func:`dinoreg_core.api.register_methods`) and prints one comparison table. By default every feature method that
can run here (``intensity``, ``mind``, ``dino3d`` with the shipped demo weights, the ``dino3d+mind`` hybrid when
present), each with its default preset (:mod:`dinoreg_core.pipeline.presets`; ``--preset`` picks another one for all).
"""

from __future__ import annotations

import logging

import numpy as np

from .common import print_label_table, print_result_summary

log = logging.getLogger("dinoreg")


DEMO_METHODS = ("intensity", "mind", "dino3d", "dino3d+mind")  # shown when they can run here


def default_methods() -> str:
    """The methods of :data:`DEMO_METHODS` that can run here (weights present, method registered)."""
    from ..pipeline import available_registration_methods, method_status

    known = [m for m in DEMO_METHODS if m in available_registration_methods()]
    status = method_status(known)
    return ",".join(m for m in known if status[m] is None)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="register a demo pair with a known deformation and print the metrics",
        description=("Warp the real CT of ../shared/data/real (or a synthetic subject when that folder is absent) by a "
                     "smooth random field, register it back with each method and print Dice per organ, the error "
                     "against the known field, folding and timings."))
    p.add_argument("--features", default=None,
                   help="comma-separated methods (default: intensity, mind, dino3d and dino3d+mind, those that can "
                        "run here)")
    p.add_argument("--preset", default="default", metavar="NAME|PATH",
                   help="preset of every method: default (each method's own), official, authors, tuned, tuned_2mm or a file")
    p.add_argument("--max-disp-mm", type=float, default=10.0, help="largest displacement of the known field (mm)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random field")
    p.add_argument("--data", default=None,
                   help="the real CT (ct_abdomen_pelvis.nii.gz) or a folder holding it (directly or in real/); default: "
                        "$DINOREG_SHARED_DATA, then ../shared/data beside a checkout, else a synthetic subject")
    p.add_argument("--out", default="results/demo", help="output folder; one sub-folder per method (default: results/demo)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of every method (see register)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..api import register_methods
    from ..demo import known_deformation_pair
    from ..evaluation.metrics import displacement_error_mm
    from ..settings import parse_assignments

    methods = [m.strip() for m in (args.features or default_methods()).split(",") if m.strip()]
    sets = dict(parse_assignments(args.set))
    from ..demo import find_demo_ct  # data discovery with a notice on fallback

    ct, tried = find_demo_ct(args.data)
    if ct is None:
        log.warning(f"notice: no real demo CT found (looked at {', '.join(tried)}); using a synthetic subject. "
                    f"Give --data DIR or set DINOREG_SHARED_DATA.")
    pair = known_deformation_pair(max_disp_mm=args.max_disp_mm, seed=args.seed, ct_path=ct)
    log.info(f"demo pair: {pair.source} warped by a smooth random field (max {args.max_disp_mm:.1f} mm)")
    sp = pair.fixed.spacing
    before = displacement_error_mm(np.zeros_like(pair.true_disp), pair.true_disp, sp, pair.body_mask)
    results = register_methods(pair.fixed, pair.moving, methods, settings={m: sets for m in methods},
                               fixed_labels=pair.fixed_labels, moving_labels=pair.moving_labels,
                               fixed_modality="ct", moving_modality="ct", label_names=pair.label_names,
                               device=args.device, out_dir=args.out, presets=args.preset)
    summary = []
    for method, res in results.items():
        after = displacement_error_mm(res.displacement, pair.true_disp, sp, pair.body_mask)
        print(f"\n== {method}")
        print_label_table(res.metrics["labels"])
        print(f"mean error against the known field (body): {before:.2f} mm -> {after:.2f} mm "
              f"({100 * (1 - after / before):.0f}% lower)")
        print_result_summary(res)
        s = res.metrics["summary"]
        summary.append((method, str(res.config.get("preset") or ""), s["dice_initial"], s["dice"], after,
                        res.metrics["field"]["folding_pct"], res.timings["total_s"]))
    print(f"\n{'method':<13}{'preset':<10}{'Dice before':>12}{'Dice after':>12}{'field err mm':>14}{'folding %':>11}"
          f"{'time s':>9}")
    for m, pr, d0, d1, err, fold, t in summary:
        print(f"{m:<13}{pr[:9]:<10}{d0:>12.3f}{d1:>12.3f}{err:>14.2f}{fold:>11.3f}{t:>9.1f}")
    print(f"(field error before registration: {before:.2f} mm; outputs in {args.out}/<method>/)")
    return 0
