#!/usr/bin/env bash
# The installed wheel does the whole job. Builds the wheel, installs it into a fresh venv in a temporary folder and,
# from another temporary folder (no PYTHONPATH, nothing of the checkout visible), runs `dinoreg reproduce --help`,
# `dinoreg notebooks`, resolves the packaged `demo` reproduce profile against the notebooks shipped in the wheel,
# and runs `dinoreg demo`.
#
#   DEPS_PY=.venv/bin/python bash .ci/wheel_check.sh   # default: the fresh venv takes its dependencies (torch, ...)
#                                                       # from DEPS_PY's site-packages (a .pth line), ~1 min
#   WHEEL_CHECK_FULL=1 bash .ci/wheel_check.sh          # install every dependency from the index into the fresh
#                                                       # venv too (measured 5-6 min on 2 busy cores, torch ~3 min)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$(pwd)"
DEPS_PY="${DEPS_PY:-$REPO/.venv/bin/python}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/dinoreg-wheel.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT
start=$(date +%s)
"$DEPS_PY" -m pip wheel -q --no-deps -w "$TMP/dist" . 2>&1 | grep -v "is ignored" || true
WHEEL="$(ls "$TMP"/dist/dinoreg-*.whl)"
if [ "${WHEEL_CHECK_FULL:-0}" = "1" ]; then
  "$DEPS_PY" -m venv "$TMP/venv"
  "$TMP/venv/bin/pip" install -q "torch==2.13.0"
  "$TMP/venv/bin/pip" install -q "$WHEEL" nbformat
else
  "$DEPS_PY" -m venv --without-pip "$TMP/venv"
  site="$("$TMP/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  "$DEPS_PY" -c 'import sysconfig; p = sysconfig.get_paths(); print(p["purelib"]); print(p["platlib"])' \
    | sort -u > "$site/_dinoreg_wheel_check_deps.pth"
  "$DEPS_PY" -m pip --python "$TMP/venv/bin/python" install -q --no-deps "$WHEEL" 2>&1 | grep -v "is ignored" || true
fi
mkdir "$TMP/run"
cd "$TMP/run"
unset PYTHONPATH
"$TMP/venv/bin/python" - <<'PY'
from pathlib import Path
import dinoreg_core
from dinoreg_core.reproduce import NOTEBOOKS, load_profile, resolve
pkg = Path(dinoreg_core.__file__).parent
assert "site-packages" in str(pkg) and Path(NOTEBOOKS).is_relative_to(pkg), (pkg, NOTEBOOKS)  # the wheel's own copy
p = resolve(load_profile("demo"), out=Path("results"), run_id="demo")
print(f"dinoreg_core from {pkg}; reproduce profile 'demo' resolves against {NOTEBOOKS}: {', '.join(p)}")
PY
"$TMP/venv/bin/dinoreg" reproduce --help > /dev/null
"$TMP/venv/bin/dinoreg" notebooks nb
test "$(ls nb/*.ipynb | wc -l)" -eq 5
# the real CT when ../shared sits beside the clone (through the documented variable), else the synthetic subject
if [ -d "$REPO/../shared/data/real" ]; then export DINOREG_SHARED_DATA="$(cd "$REPO/../shared/data" && pwd)"; fi
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$TMP/venv/bin/dinoreg" demo --features mind --out demo_out | tail -3
test -f demo_out/mind/metrics.json
echo "wheel check passed in $(( $(date +%s) - start )) s"
