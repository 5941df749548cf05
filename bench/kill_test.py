"""kill -9 at random moments of ``dinoreg register``, ``pretrain`` and ``reproduce`` on tiny inputs.

    PYTHONPATH=. python bench/kill_test.py [--kills-register 10] [--kills-pretrain 8] [--kills-reproduce 3]
                                           [--seed 0] [--work DIR] [--log results/bench/kill_test.md]

For each command: one uninterrupted run first (its wall time T sets the range of kill moments), then repeated runs
into the same folder, each killed with SIGKILL (the whole process group: papermill kernels too) at a random moment,
in turn: uniform in [0, T]; 0-100 ms after writing began (a staging folder, an atomic temp file or a running
notebook appeared); in the last 30 % of T. After every
kill the folder is checked:

* no file under a final name is partial: every ``.nii.gz`` loads, every ``.json`` parses, every checkpoint loads
  with ``torch.load(weights_only=True)``;
* register: when ``outputs.json`` is present, every file it lists matches its size and SHA-256 (present = complete);
* reproduce: every recorded step (``steps/*.json``) still has every output it lists;
* leftovers that only a killed process leaves (hidden atomic temp files, ``.dinoreg-staging-*``, a
  ``*.running.ipynb``) are counted — ``kill -9`` cannot be caught — and must be gone after the rerun.

Then a final rerun must complete (exit 0, complete set, leftovers swept), and for pretraining the final checkpoint and
exported teacher, reached through kills and ``--resume``, must equal the uninterrupted run's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dinoreg_core.outputs import STAGING_PREFIX, TEMP_PATTERN, verify  # noqa: E402

REG_SET = ["--set", "grid_sp=4", "--set", "iterations=40"]
PRETRAIN_CFG = {
    "model": "tiny", "model_overrides": {"depth": 1, "embed_dim": 24, "num_heads": 2, "pos_grid": [8, 8, 8]},
    "head_out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
    "augment": {"global_size": 16, "local_size": 8, "n_local": 1}, "batch_size": 2, "warmup_steps": 1,
    "freeze_last_layer_steps": 1, "teacher_temp_warmup_steps": 2, "lr": 1e-4, "log_every": 1, "ckpt_every": 1,
    "threads": 1, "progress": False, "spacing_mm": 2.0, "steps": 8, "drop_path_rate": 0.1,
}
REPRODUCE_PROFILE = {  # the smallest profile (as tests/test_reproduce.py)
    "name": "tiny", "description": "smallest parameters (kill test)",
    "common": {"dataset": "synthetic", "n_subjects": 3, "n_val_subjects": 2, "cohort_seed": 0, "spacing_mm": 8.0,
               "shape": [40, 32, 36], "workers": 1, "device": "cpu"},
    "steps": {
        "01_pretrain_3d_dino": {"train": "train", "corpus_subjects": 2, "corpus_spacing_mm": 8.0,
                                "corpus_shape": [40, 32, 36], "corpus_workers": 1, "steps": 2,
                                "overrides": {"batch_size": 2, "augment.n_local": 2, "log_every": 1}},
        "02_feature_maps": {"methods": ["mind"]},
        "03_evaluate_registration": {"tasks": ["ctct"], "pairs_per_task": 2, "methods": ["intensity", "mind"],
                                     "method_settings": {"mind": {"grid_sp": 4}}},
        "04_paper_figures": {"reference": "mind"},
    },
}


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    e["PYTHONPATH"] = str(REPO) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def dinoreg(args, cwd) -> list[str]:
    return [sys.executable, "-m", "dinoreg_core.cli", *args]


def run_full(args, cwd) -> tuple[int, float]:
    t = time.time()
    r = subprocess.run(dinoreg(args, cwd), cwd=cwd, env=env(), capture_output=True, text=True)
    if r.returncode != 0:
        print(r.stdout[-2000:], r.stderr[-2000:], file=sys.stderr)
    return r.returncode, time.time() - t


def run_killed(args, cwd, after_s: float) -> int | None:
    """Start the command, SIGKILL its process group after ``after_s`` s; None if it finished first (its rc else)."""
    p = subprocess.Popen(dinoreg(args, cwd), cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        p.wait(timeout=after_s)
        return p.returncode
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        return None


def run_killed_when(args, cwd, seen, delay_s: float, timeout_s: float) -> tuple[int | None, bool]:
    """Start the command; SIGKILL it ``delay_s`` after ``seen()`` first holds (a temp or staging file appeared: the
    moment of writing). Returns (rc or None when killed, whether the moment was seen)."""
    p = subprocess.Popen(dinoreg(args, cwd), cwd=cwd, env=env(), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True)
    t0, hit = time.time(), False
    while p.poll() is None and time.time() - t0 < timeout_s:
        if seen():
            hit = True
            time.sleep(delay_s)
            break
        time.sleep(0.002 if ".nii" in str(args) or "pretrain" in args else 0.02)
    if p.poll() is not None:
        return p.returncode, hit
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    return None, hit


def moment(rng: random.Random, i: int, total: float) -> tuple[str, float]:
    """Kill moment ``i``, by turns: uniform over the run, when files are being written (+ 0-100 ms), in the last 30 %."""
    kind = ("uniform", "writing", "late")[i % 3]
    if kind == "writing":
        return kind, rng.uniform(0.0, 0.1)
    return kind, (rng.uniform(0.05, 1.0) if kind == "uniform" else rng.uniform(0.7, 1.0)) * total


def kill_once(args, cwd, kind: str, t: float, seen, timeout_s: float) -> tuple[int | None, str]:
    if kind == "writing":
        rc, hit = run_killed_when(args, cwd, seen, t, timeout_s)
        return rc, f"{t * 1000:.0f} ms after writing began" + ("" if hit else " (never seen)")
    return run_killed(args, cwd, t), f"at {t:.1f} s"


def _writing(folder: Path):
    """True once a staging folder or an atomic temp file exists under ``folder``."""
    def seen() -> bool:
        if not folder.is_dir():
            return False
        try:
            return any(p.name.startswith(STAGING_PREFIX) or TEMP_PATTERN.match(p.name) or p.name.endswith(
                ".running.ipynb") for p in folder.rglob(".*" if "rep" not in folder.name else "*"))
        except FileNotFoundError:
            return False
    return seen


def leftovers(folder: Path) -> list[str]:
    out = []
    for p in folder.rglob("*"):
        if p.name.startswith(STAGING_PREFIX) or TEMP_PATTERN.match(p.name) or p.name.endswith(".running.ipynb"):
            out.append(str(p.relative_to(folder)))
    return sorted(out)


def partial_final_files(folder: Path) -> list[str]:
    """Files under final (non-temp) names that do not load."""
    import torch

    bad = []
    for p in folder.rglob("*"):
        if not p.is_file() or any(part.startswith(".") for part in p.relative_to(folder).parts) \
                or p.name.endswith(".running.ipynb"):
            continue
        try:
            if p.name.endswith(".nii.gz"):
                np.asanyarray(nib.load(str(p)).dataobj)
            elif p.suffix in (".json", ".ipynb"):
                json.loads(p.read_text())
            elif p.suffix == ".pt":
                torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            bad.append(f"{p.relative_to(folder)} ({type(e).__name__})")
    return bad


def make_inputs(work: Path) -> None:
    from scipy.ndimage import gaussian_filter, shift

    rng = np.random.default_rng(0)
    a = gaussian_filter(rng.normal(size=(32, 32, 32)), 2)
    a = ((a - a.min()) / (a.max() - a.min()) * 1000 - 500).astype(np.float32)
    b = shift(a, (1.5, -1.0, 0.5), order=1, mode="nearest").astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    (work / "in").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(a, aff), str(work / "in/fixed.nii.gz"))
    nib.save(nib.Nifti1Image(b, aff), str(work / "in/moving.nii.gz"))
    nib.save(nib.Nifti1Image(((a > 0) + (a > 200)).astype(np.int16), aff), str(work / "in/flab.nii.gz"))
    nib.save(nib.Nifti1Image(((b > 0) + (b > 200)).astype(np.int16), aff), str(work / "in/mlab.nii.gz"))
    (work / "scans").mkdir(exist_ok=True)
    for i in range(3):
        c = gaussian_filter(rng.normal(size=(40, 40, 40)), 2) * 3000 - 300
        nib.save(nib.Nifti1Image(c.astype(np.float32), aff), str(work / f"scans/s{i}.nii.gz"))
    (work / "pretrain.json").write_text(json.dumps(PRETRAIN_CFG))
    (work / "tiny_profile.json").write_text(json.dumps(REPRODUCE_PROFILE))


# -------------------------------------------------------------------------------------------------- commands
def kill_register(work: Path, n: int, rng: random.Random, log) -> bool:
    out = work / "reg_out"
    args = ["register", "in/fixed.nii.gz", "in/moving.nii.gz", "--fixed-labels", "in/flab.nii.gz",
            "--moving-labels", "in/mlab.nii.gz", "--out", str(out), *REG_SET]
    rc, T = run_full(args, work)
    log(f"register: uninterrupted run rc {rc}, {T:.1f} s, complete: {verify(out) is None}")
    ok = rc == 0 and verify(out) is None
    kills, i = 0, 0
    while kills < n and i < 4 * n:
        kind, t = moment(rng, i, T)
        i += 1
        rc, when = kill_once(args, work, kind, t, _writing(out), 3 * T)
        kills += rc is None
        state = verify(out)
        complete = state is None
        bad = partial_final_files(out)
        left = leftovers(out)
        ok &= not bad and (complete or not (out / "outputs.json").exists())
        log(f"register {'kill ' + str(kills) if rc is None else 'attempt'}: {when} ({'finished first, rc ' + str(rc) if rc is not None else 'killed'})"
            f"; set {'complete' if complete else 'incomplete (no outputs.json)'}; partial final files {bad or 'none'};"
            f" leftovers {left or 'none'}")
    rc, _ = run_full(args, work)
    left = leftovers(out)
    done = rc == 0 and verify(out) is None and not left and kills >= n
    log(f"register rerun: rc {rc}, complete {verify(out) is None}, leftovers after rerun {left or 'none'}")
    return ok and done


def _same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def kill_pretrain(work: Path, n: int, rng: random.Random, log) -> bool:
    """Cycles of: a fresh run folder, runs killed (then ``--resume``) until it finishes, compared bit for bit with the
    uninterrupted run; until ``n`` kills happened."""
    import torch
    from safetensors.torch import load_file

    ref = work / "pt_ref"
    rc, T = run_full(["pretrain", "--config", "pretrain.json", "--data", "scans", "--out", str(ref)], work)
    log(f"pretrain: uninterrupted run rc {rc}, {T:.1f} s")
    ok = rc == 0
    a = torch.load(ref / "checkpoint.pt", weights_only=True)
    ea = load_file(ref / "teacher_backbone.safetensors")
    kills, cycle, attempts = 0, 0, 0
    keys = ("student", "teacher", "dino_center", "ibot_center", "optimizer", "scaler", "rng", "samples", "step")
    while kills < n and attempts < 4 * n:
        run = work / f"pt_run{cycle}"
        while kills < n and attempts < 4 * n and not (run / "teacher_backbone.safetensors").exists():
            attempts += 1
            kind, t = moment(rng, attempts - 1, T)
            args = ["pretrain", "--config", "pretrain.json", "--data", "scans", "--out", str(run)]
            if (run / "checkpoint.pt").exists() or (run / "checkpoint.prev.pt").exists():
                args.append("--resume")
            rc, when = kill_once(args, work, kind, t, _writing(run), 3 * T)
            kills += rc is None
            bad = partial_final_files(run) if run.exists() else []
            step = None
            for name in ("checkpoint.pt", "checkpoint.prev.pt"):
                if (run / name).exists():
                    step = torch.load(run / name, map_location="cpu", weights_only=True)["step"]
                    break
            ok &= not bad and rc in (None, 0)
            log(f"pretrain run {cycle}, {'kill ' + str(kills) if rc is None else 'attempt'}: {when} "
                f"({'finished first, rc ' + str(rc) if rc is not None else 'killed'}); newest checkpoint step {step}; "
                f"partial final files {bad or 'none'}; leftovers {(leftovers(run) if run.exists() else []) or 'none'}")
        if not (run / "teacher_backbone.safetensors").exists():
            rc, _ = run_full(["pretrain", "--config", "pretrain.json", "--data", "scans", "--out", str(run),
                              "--resume"], work)
            log(f"pretrain run {cycle} rerun (--resume) to the end: rc {rc}")
            ok &= rc == 0
        b = torch.load(run / "checkpoint.pt", weights_only=True)
        same = all(_same(a[k], b[k]) for k in keys)
        same_export = _same(ea, load_file(run / "teacher_backbone.safetensors"))
        left = leftovers(run)
        log(f"pretrain run {cycle} through kills + --resume vs uninterrupted: checkpoint bit-identical {same}, "
            f"exported teacher bit-identical {same_export}; leftovers after the rerun {left or 'none'}")
        ok &= same and same_export and not left
        cycle += 1
    return ok and kills >= n


def kill_reproduce(work: Path, n: int, rng: random.Random, log) -> bool:
    ref_out, out = work / "rep_ref", work / "rep_out"
    base = ["reproduce", "--profile", "tiny_profile.json", "--no-progress"]
    rc, T = run_full(base + ["--out", str(ref_out)], work)
    log(f"reproduce: uninterrupted run rc {rc}, {T:.1f} s")
    ok = rc == 0
    kills, i, fresh = 0, 0, []
    while kills < n and i < 3 * n:
        kind, t = moment(rng, i, T)
        i += 1
        rc, when = kill_once(base + ["--out", str(out)] + fresh, work, kind, t, _writing(out), 3 * T)
        when += " (--fresh)" if fresh else ""
        kills += rc is None
        fresh = ["--fresh"] if rc == 0 else []  # a finished run: the next one starts over, so there is work to kill
        run = out / "runs" / "tiny"
        recorded, broken = [], []
        for rec in sorted((run / "steps").glob("*.json")) if (run / "steps").is_dir() else []:
            d = json.loads(rec.read_text())
            recorded.append(d["step"][:2])
            broken += [f for f in d.get("outputs", []) if not Path(f).exists()]
        bad = partial_final_files(out) if out.exists() else []
        ok &= not broken and not bad
        log(f"reproduce {'kill ' + str(kills) if rc is None else 'attempt'}: {when} ({'finished first, rc ' + str(rc) if rc is not None else 'killed'})"
            f"; recorded steps {recorded or 'none'}; missing outputs of recorded steps {broken or 'none'}; partial "
            f"final files {bad or 'none'}; leftovers {(leftovers(out) if out.exists() else []) or 'none'}")
    rc, T2 = run_full(base + ["--out", str(out)], work)
    summary = json.loads((out / "runs/tiny/summary.json").read_text()) if rc == 0 else {}
    statuses = [s["status"] for s in summary.get("steps", [])]
    left = leftovers(out)
    log(f"reproduce rerun: rc {rc}, {T2:.1f} s, steps {statuses}, leftovers after the rerun {left or 'none'}")
    return ok and rc == 0 and not left


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills-register", type=int, default=10)
    ap.add_argument("--kills-pretrain", type=int, default=8)
    ap.add_argument("--kills-reproduce", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=None)
    ap.add_argument("--log", default=str(REPO / "results" / "bench" / "kill_test.md"))
    a = ap.parse_args()
    rng = random.Random(a.seed)
    work = Path(a.work or tempfile.mkdtemp(prefix="dinoreg_kill_"))
    work.mkdir(parents=True, exist_ok=True)
    make_inputs(work)
    lines = []

    def log(s):
        print(s, flush=True)
        lines.append(s)

    log(f"# kill -9 test ({time.strftime('%Y-%m-%d %H:%M %Z')}, {os.cpu_count()} CPUs, OMP_NUM_THREADS=1, load "
        f"{os.getloadavg()[0]:.1f}, seed {a.seed})\n")
    log(f"command: PYTHONPATH=. {Path(sys.executable).name} bench/kill_test.py --kills-register {a.kills_register} "
        f"--kills-pretrain {a.kills_pretrain} --kills-reproduce {a.kills_reproduce} --seed {a.seed}\n")
    results = {}
    for name, fn, k in (("register", kill_register, a.kills_register), ("pretrain", kill_pretrain, a.kills_pretrain),
                        ("reproduce", kill_reproduce, a.kills_reproduce)):
        if k > 0:
            results[name] = fn(work, k, rng, log)
            log("")
    log("result: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in results.items()) +
        f" ({sum('(killed)' in s for s in lines)} kills -9)")
    Path(a.log).parent.mkdir(parents=True, exist_ok=True)
    Path(a.log).write_text("\n".join(f"    {s}" if s and not s.startswith(("#", "command", "result")) else s
                                     for s in lines) + "\n")
    return 0 if all(results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
