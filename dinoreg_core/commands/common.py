"""Output helpers shared by the CLI commands: result tables (stdout) and status lines (the ``dinoreg`` logger)."""

from __future__ import annotations

import logging
import math

log = logging.getLogger("dinoreg")


def _f(x, nd=3) -> str:
    return "   n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def print_label_table(rows: list[dict]) -> None:
    """Print per-label Dice before/after and HD95 as a fixed-width table (stdout: a result)."""
    print(f"{'label':<34}{'Dice before':>12}{'Dice after':>12}{'HD95 mm':>10}")
    for r in rows:
        print(f"{(str(r['label']) + ' ' + str(r['name']))[:33]:<34}{_f(r['dice_initial']):>12}{_f(r['dice']):>12}"
              f"{_f(r['hd95_mm'], 1):>10}")


def print_result_summary(res) -> None:
    """Print the summary of a RegistrationResult (mean Dice, field quality: stdout) and log timings and files."""
    m = res.metrics
    if "summary" in m:
        s = m["summary"]
        print(f"mean Dice {_f(s['dice_initial'])} -> {_f(s['dice'])}   mean HD95 {_f(s['hd95_mm'], 1)} mm")
    fm = m["field"]
    print(f"SDlogJ {_f(fm['sdlogj'])} (Learn2Reg {_f(fm['sdlogj_l2r'])})   folding {_f(fm['folding_pct'], 3)} %")
    t = res.timings
    log.info(f"time: total {t['total_s']:.1f} s (features {t['features_s']:.1f} s, ConvexAdam {t['convex_adam_s']:.1f} s, "
             f"initial alignment {t['init_s']:.1f} s)   peak RSS {t['peak_rss_mb']:.0f} MB")
    if res.outputs:
        log.info("wrote: " + ", ".join(sorted(res.outputs.values())))
