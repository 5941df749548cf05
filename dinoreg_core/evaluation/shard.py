"""Evaluation sharded over processes (one GPU each, one or many nodes), launched like pretraining with ``torchrun``.

    torchrun --nproc_per_node N [--nnodes M ...] -m dinoreg_core.evaluation.shard SPEC.json

Each process reads its rank and the number of processes from the ``RANK`` / ``WORLD_SIZE`` (and ``LOCAL_RANK``)
environment variables that ``torchrun`` sets (absent: one process, rank 0), takes every ``WORLD_SIZE``-th pair
starting at its rank, and evaluates those pairs with :func:`dinoreg_core.evaluation.runner.evaluate`. No process
group is needed: the processes meet through files in the spec's ``out_dir`` (a folder every process can see; on
several nodes a shared file system):

* ``parts/<hash>/<index>_<pair>.csv`` — one file per finished pair, written atomically: a killed evaluation,
  rerun with the same spec, starts at the first unfinished pair;
* ``shards/<hash>/rank-R-of-W.csv`` — the rows of rank R, written atomically when it is done
  (``rank-R-of-W.failed`` holds the one-sentence reason when it failed);
* ``merged-<hash>.csv`` — written by rank 0 once every shard is there: the rows of all pairs in the spec's pair
  order, the same table one process gives (runtime and memory columns aside).

``<hash>`` is a hash of everything that determines the rows (pairs, methods, settings, dataset name, device
kind), so a changed spec never mixes with old files. :func:`run_evaluation` is the entry point of notebook 03: one
process in-process, or ``processes > 1`` launched through ``torchrun`` on this machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from ..atomic import atomic_path, write_json_atomic, write_text_atomic
from ..errors import DinoregError
from .runner import PairSpec, evaluate


@dataclass
class EvalSpec:
    """Everything one evaluation needs; JSON-serialisable with :meth:`to_dict` / :meth:`from_dict`."""

    pairs: list[PairSpec]
    methods: list[str]
    dataset: str = "dataset"
    method_settings: dict = field(default_factory=dict)
    label_names: dict | None = None
    device: str = "cpu"  # "cuda" means cuda:LOCAL_RANK in each process
    out_dir: str = "evaluation"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pairs"] = [{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(p).items()} for p in self.pairs]
        d["label_names"] = {str(k): v for k, v in (self.label_names or {}).items()} or None
        return json.loads(json.dumps(d, default=str))

    @classmethod
    def from_dict(cls, d: dict) -> "EvalSpec":
        pairs = []
        for p in d["pairs"]:
            p = dict(p)
            for k in ("fixed", "moving", "fixed_labels", "moving_labels"):
                p[k] = Path(p[k]) if p.get(k) else None
            if p.get("label_map"):
                p["label_map"] = {int(k): int(v) for k, v in p["label_map"].items()}
            pairs.append(PairSpec(**p))
        names = {int(k): v for k, v in (d.get("label_names") or {}).items()} or None
        return cls(pairs=pairs, methods=list(d["methods"]), dataset=d.get("dataset", "dataset"),
                   method_settings=dict(d.get("method_settings") or {}), label_names=names,
                   device=d.get("device", "cpu"), out_dir=d.get("out_dir", "evaluation"))

    def hash(self) -> str:
        """Hash of what determines the rows (not the output folder). Files named in the settings (e.g. dino3d's
        ``feat.weights``) and the shipped demo weights count by size and time stamp, so weights retrained at the
        same path never reuse rows computed with the old ones."""
        d = self.to_dict()
        d.pop("out_dir")
        d["device"] = d["device"].split(":")[0]
        d["method_settings"] = {m: {k: _fingerprint(v) for k, v in st.items()}
                                for m, st in (d.get("method_settings") or {}).items()}
        if "dino3d" in self.methods:
            from ..features.dino3d import DEFAULT_WEIGHTS

            d["shipped_weights"] = _fingerprint(str(DEFAULT_WEIGHTS))
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def _fingerprint(value):
    """``value``, or [value, size, mtime] when it names an existing file."""
    if isinstance(value, str) and value:
        try:
            p = Path(value).expanduser()
            if p.is_file():
                st = p.stat()
                return [value, st.st_size, st.st_mtime_ns]
        except OSError:
            pass
    return value


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) from ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (defaults 0, 1, 0)."""
    try:
        rank = int(os.environ.get("RANK", 0))
        world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise DinoregError("The environment variables RANK, WORLD_SIZE and LOCAL_RANK must be integers.") from None
    if world < 1 or not 0 <= rank < world:
        raise DinoregError(f"RANK={rank} does not lie in 0..WORLD_SIZE-1 (WORLD_SIZE={world}).")
    return rank, world, local


def shard_indices(n_pairs: int, rank: int, world: int) -> list[int]:
    """Indices of the pairs rank ``rank`` of ``world`` evaluates (round robin, so ranks get similar pairs)."""
    return list(range(rank, n_pairs, world))


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _paths(spec: EvalSpec, world: int) -> dict:
    out, h = Path(spec.out_dir), spec.hash()
    return {"parts": out / "parts" / h, "shards": out / "shards" / h, "merged": out / f"merged-{h}.csv",
            "shard": lambda r: out / "shards" / h / f"rank-{r}-of-{world}.csv",
            "failed": lambda r: out / "shards" / h / f"rank-{r}-of-{world}.failed"}


def run_shard(spec: EvalSpec, rank: int, world: int, *, progress: bool = True) -> pd.DataFrame:
    """Evaluate this rank's pairs (skipping pairs whose part file exists) and write its shard CSV atomically."""
    P = _paths(spec, world)
    P["parts"].mkdir(parents=True, exist_ok=True)
    P["shards"].mkdir(parents=True, exist_ok=True)
    failed = P["failed"](rank)
    failed.unlink(missing_ok=True)
    device = spec.device
    if device == "cuda":
        device = f"cuda:{world_from_env()[2]}"
    frames = []
    try:
        idx = shard_indices(len(spec.pairs), rank, world)
        for i in idx:
            pair = spec.pairs[i]
            part = P["parts"] / f"{i:05d}_{_safe(pair.name)}.csv"
            if part.exists():
                frames.append(pd.read_csv(part, keep_default_na=True))
                continue
            df = evaluate([pair], spec.methods, dataset=spec.dataset, label_names=spec.label_names,
                          method_settings=spec.method_settings, device=device, progress=progress)
            with atomic_path(part) as tmp:
                df.to_csv(tmp, index=False)
            frames.append(pd.read_csv(part))
    except BaseException as e:
        msg = str(e) if isinstance(e, DinoregError) else f"{type(e).__name__}: {e}"
        write_text_atomic(failed, " ".join(msg.split()) + "\n")
        raise
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    with atomic_path(P["shard"](rank)) as tmp:
        df.to_csv(tmp, index=False)
    return df


def merge_shards(spec: EvalSpec, world: int, *, timeout_s: float = 7 * 24 * 3600, poll_s: float = 1.0) -> pd.DataFrame:
    """Wait for every rank's shard CSV, then concatenate them in the spec's pair order and write ``merged-<hash>.csv``
    atomically (rank 0's job). Stops with one sentence when a rank failed or ``timeout_s`` passed."""
    P = _paths(spec, world)
    t0 = time.monotonic()
    while True:
        for r in range(world):
            if P["failed"](r).exists():
                reason = P["failed"](r).read_text().strip()
                raise DinoregError(f"Evaluation rank {r} of {world} failed: {reason.rstrip('.')}.")
        missing = [r for r in range(world) if not P["shard"](r).exists()]
        if not missing:
            break
        if time.monotonic() - t0 > timeout_s:
            raise DinoregError(f"Evaluation shards of rank(s) {missing} did not appear in {P['shards']} within "
                               f"{timeout_s:.0f} s.")
        time.sleep(poll_s)
    frames = []
    for r in range(world):
        try:
            frames.append(pd.read_csv(P["shard"](r)))
        except pd.errors.EmptyDataError:
            continue
    if not frames:
        raise DinoregError(f"No evaluation rows were written to {P['shards']}; are there pairs in the spec?")
    df = pd.concat(frames, ignore_index=True)
    order = {p.name: i for i, p in enumerate(spec.pairs)}
    df = df.assign(_k=df["pair"].astype(str).map(order)).sort_values("_k", kind="stable").drop(columns="_k")
    df = df.reset_index(drop=True)
    df["settings"] = df["settings"].fillna("")
    with atomic_path(P["merged"]) as tmp:
        df.to_csv(tmp, index=False)
    return df


def evaluate_sharded(spec: EvalSpec, *, rank: int | None = None, world: int | None = None,
                     progress: bool = True) -> pd.DataFrame | None:
    """This process's share of the evaluation; rank 0 also merges and returns the whole table (others: None).
    ``rank``/``world`` default to the ``torchrun`` environment (one process without it)."""
    if rank is None or world is None:
        rank, world, _ = world_from_env()
    run_shard(spec, rank, world, progress=progress and rank == 0)
    if rank != 0:
        return None
    return merge_shards(spec, world)


def run_evaluation(spec: EvalSpec, *, processes: int = 1, progress: bool = True) -> pd.DataFrame:
    """Evaluate ``spec``: in this process (``processes=1``), or in ``processes`` processes on this machine launched
    with ``torchrun``. The spec is written to ``out_dir/spec-<hash>.json`` either way; for several nodes run
    ``torchrun ... -m dinoreg_core.evaluation.shard`` on that file on every node yourself. Returns the merged table."""
    processes = int(processes)
    if processes < 1:
        raise DinoregError(f"processes must be at least 1, got {processes}.")
    out = Path(spec.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / f"spec-{spec.hash()}.json"  # also the file to hand to torchrun on other nodes
    write_json_atomic(spec_path, spec.to_dict())
    if processes == 1:
        return evaluate_sharded(spec, rank=0, world=1, progress=progress)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "dinoreg_core.evaluation.shard", str(spec_path)] + ([] if progress else ["--no-progress"])
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(cmd, env=env, capture_output=not progress, text=True)
    P = _paths(spec, processes)
    for r in range(processes):
        if P["failed"](r).exists():
            raise DinoregError(f"Evaluation rank {r} of {processes} failed: "
                               f"{P['failed'](r).read_text().strip().rstrip('.')}.")
    if proc.returncode != 0 or not P["merged"].exists():
        raise DinoregError(f"The {processes} evaluation processes launched with torchrun stopped with status "
                           f"{proc.returncode} before writing {P['merged']}.")
    df = pd.read_csv(P["merged"])
    df["settings"] = df["settings"].fillna("")
    return df


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m dinoreg_core.evaluation.shard",
                                 description="Evaluate this process's share of SPEC.json (run under torchrun).")
    ap.add_argument("spec", help="spec JSON written by run_evaluation (EvalSpec.to_dict)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    try:
        try:
            d = json.loads(Path(a.spec).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DinoregError(f"The evaluation spec {a.spec} cannot be read ({e}).") from None
        spec = EvalSpec.from_dict(d)
        df = evaluate_sharded(spec, progress=not a.no_progress)
        if df is not None:
            print(f"merged {len(df)} rows into {_paths(spec, world_from_env()[1])['merged']}")
    except DinoregError as e:
        print("dinoreg: error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
