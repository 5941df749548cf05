"""Table-driven fault test: the CLI on every bad input and fault of ``tests/fault_cases.py`` (>= 60 cases).

Each case must exit with status 2, print exactly one line on stderr naming the culprit, no traceback, and leave its
output folder untouched (byte for byte; for the cases that reuse a folder, the complete earlier set it held stays
complete). Most run in-process through ``dinoreg_core.cli.main``; a few as real subprocesses.
"""

from __future__ import annotations

import pytest

from fault_cases import CASES, make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("faults"))


def test_the_table_is_large_and_distinct():
    names = [c.name for c in CASES]
    assert len(names) >= 60 and len(set(names)) == len(names)
    assert len({c.what for c in CASES}) == len(CASES)
    assert sum(c.copy_prev for c in CASES) >= 30  # most cases reuse a folder holding a complete earlier set


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_fault(case, ws):
    from fault_cases import run_case

    r = run_case(case, ws)
    lines = [ln for ln in r["stderr"].splitlines() if ln.strip()]
    assert r["rc"] == 2, f"exit {r['rc']}; stderr: {r['stderr'][-2000:]}"
    assert "Traceback" not in r["stderr"]
    assert len(lines) == 1, f"{len(lines)} stderr lines: {r['stderr'][-2000:]}"
    assert case.culprit in lines[0], f"{case.culprit!r} not named in: {lines[0]}"
    assert r["after"] == r["before"], "the output folder changed"
    if r["complete_before"]:
        assert r["complete_after"], "the earlier complete set is no longer complete"
    if case.check:
        case.check(ws)
