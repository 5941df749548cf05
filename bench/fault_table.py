"""Write the README's fault table (case -> behaviour) from the cases of ``tests/fault_cases.py``.

    PYTHONPATH=. python bench/fault_table.py [--out docs/notes/p16.md]

Runs every case exactly as ``tests/test_faults.py`` does (tiny volumes in a temporary folder) and replaces the part
of ``--out`` between ``<!-- fault-table:start -->`` and ``<!-- fault-table:end -->`` with a Markdown table: the
case, the exit status, the one stderr line (workspace paths shortened to ``…/``) and whether the output folder was
left untouched.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from fault_cases import CASES, make_workspace, run_case  # noqa: E402

START, END = "<!-- fault-table:start -->", "<!-- fault-table:end -->"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "notes" / "p16.md"))
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(Path(tmp).resolve())
        rows = ["| # | case | exit | stderr (one line) | output folder |", "|---|---|---|---|---|"]
        for i, case in enumerate(CASES, 1):
            r = run_case(case, ws)
            line = " ".join(r["stderr"].split()).replace(str(ws) + "/", "…/").replace(str(ws), "…")
            line = line.replace("|", "\\|")
            kept = "untouched" if r["after"] == r["before"] else "CHANGED"
            if r["complete_before"]:
                kept += ", earlier set complete" if r["complete_after"] else ", earlier set BROKEN"
            how = " (subprocess)" if case.subprocess else ""
            rows.append(f"| {i} | {case.what}{how} | {r['rc']} | {line} | {kept} |")
    table = "\n".join(rows)
    p = Path(a.out)
    text = p.read_text() if p.exists() else f"{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1] if END in rest else "\n"
    p.write_text(f"{head}{START}\n{table}\n{END}{tail}")
    print(f"wrote {len(CASES)} cases into {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
