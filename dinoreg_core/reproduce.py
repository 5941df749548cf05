"""Run the notebook suite 01 -> 04 with papermill, resumably: ``dinoreg reproduce --profile demo|paper``.

A *profile* (``dinoreg_core/configs/reproduce_<name>.json``, or any JSON file of the same form) gives the parameters
of each notebook::

    {"name": "demo", "description": "...", "common": {...}, "steps": {"01_pretrain_3d_dino": {...}, ...}}

``common`` holds parameters handed to every notebook that has them; each step's own parameters come on top, then
``--set`` overrides (``KEY=VALUE`` for every notebook with that parameter, ``NN.KEY=VALUE`` for notebook ``NN``;
values are read as JSON where possible). Every notebook also receives ``run_dir``, ``figures_dir`` and
``tables_dir``; an unknown parameter name stops the run before anything executes.

Where things land (``OUT`` = ``--out``, default ``results``; ``RUN`` = ``--run-id``, default the profile name)::

    OUT/runs/RUN/           executed notebooks (NN_name.ipynb), data, pretraining run, evaluation shards,
                            handoff/*.json (what a notebook hands to the next), steps/*.json (finished steps),
                            parameters.json (the resolved parameters), summary.json
    OUT/figures/RUN/        figures (PNG)
    OUT/tables/RUN/         tables (CSV + Markdown) and parameters.json

Resumable: a step is skipped when ``steps/NN_name.json`` records the same parameter hash and every output it
listed still exists. The hash covers the step's resolved parameters, the notebook's code cells, the hashes of the
steps before it and the shipped demo weights' size and time stamp, so a change anywhere (demo weights that land
included) reruns that step and everything after it. A step is recorded only after
its notebook ran to the end, so a run stopped or killed mid-way reruns only the unfinished steps. A failing step
stops the run with one sentence naming the notebook; the finished steps are kept, and the failing notebook is
kept as ``NN_name.failed.ipynb`` with the error in it.

Kernel: the notebooks run on the Jupyter kernel ``kernel_name`` (default ``python3``). Its kernelspec's command
``python`` is replaced by the Python running ``dinoreg`` (jupyter_client does this), so the kernel is the virtual
environment's Python without registering anything; use ``--kernel NAME`` for another registered kernel
(``python -m ipykernel install --user --name NAME``).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from . import settings
from .atomic import write_json_atomic
from .errors import DinoregError
from .outputs import sweep_tree

PACKAGE = Path(__file__).resolve().parent
PROFILES = PACKAGE / "configs"
# p15: an installed wheel ships the suite as dinoreg_core/notebooks/; a checkout (or editable install) has notebooks/.
NOTEBOOKS = PACKAGE / "notebooks" if (PACKAGE / "notebooks").is_dir() else PACKAGE.parent / "notebooks"
STEPS = ("01_pretrain_3d_dino", "02_feature_maps", "03_evaluate_registration", "04_paper_figures")
INJECTED = ("run_dir", "figures_dir", "tables_dir")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a run id: one plain folder name


# ---------------------------------------------------------------------------------------------- profiles
def profile_names() -> list[str]:
    return sorted(p.stem.replace("reproduce_", "") for p in PROFILES.glob("reproduce_*.json"))


def load_profile(name_or_path: str) -> dict:
    """A packaged profile by name (``demo``, ``paper``) or a profile JSON file."""
    p = Path(name_or_path)
    if not p.is_file():
        if "/" in str(name_or_path) or str(name_or_path).endswith(".json"):
            raise DinoregError(f"The profile file {name_or_path} does not exist.")
        p = PROFILES / f"reproduce_{name_or_path}.json"
        if not p.is_file():
            raise DinoregError(f"There is no reproduce profile named '{name_or_path}'; "
                               f"known profiles: {', '.join(profile_names())} (or give a JSON file).")
    try:
        prof = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DinoregError(f"The profile {p} is not valid JSON ({e}).") from None
    steps = prof.get("steps")
    if not isinstance(steps, dict) or not steps:
        raise DinoregError(f"The profile {p} has no 'steps' object mapping notebook names to parameters.")
    bad = [s for s in steps if s not in STEPS]
    if bad:
        raise DinoregError(f"The profile {p} names unknown notebook(s) {', '.join(bad)}; known: {', '.join(STEPS)}.")
    prof.setdefault("name", p.stem.replace("reproduce_", ""))
    prof["_path"] = str(p)
    return prof


def notebook_parameters(path: Path) -> dict:
    """Names and default values (where literal) of the notebook's ``parameters`` cell."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            out = {}
            for node in ast.parse(cell.source).body:
                if isinstance(node, ast.Assign):
                    for t in node.targets:
                        if isinstance(t, ast.Name):
                            try:
                                out[t.id] = ast.literal_eval(node.value)
                            except ValueError:
                                out[t.id] = None
            return out
    raise DinoregError(f"The notebook {path} has no cell tagged 'parameters'.")


def resolve(profile: dict, *, out: Path, run_id: str, sets=(), notebooks: Path = NOTEBOOKS) -> dict:
    """{step: parameters} for the steps of ``profile`` in order, with the injected folders and ``--set`` applied."""
    run_dir, figs, tabs = out / "runs" / run_id, out / "figures" / run_id, out / "tables" / run_id
    steps = [s for s in STEPS if s in profile["steps"]]
    overrides = []
    for k, v in settings.parse_assignments(sets):
        s = f"{k}={v}"
        step = None
        if "." in k and k.split(".", 1)[0].isdigit():
            nn, k = k.split(".", 1)
            step = next((x for x in steps if x.startswith(nn)), None)
            if step is None:
                raise DinoregError(f"The override '{s}' names notebook {nn}, which is not a step of this profile.")
        overrides.append((step, k, settings.parse_literal(v, k)))
    resolved = {}
    for step in steps:
        nb = notebooks / f"{step}.ipynb"
        if not nb.is_file():
            raise DinoregError(f"The notebook {nb} does not exist (the installed package lacks its notebooks; "
                               f"reinstall dinoreg or run from a checkout).")
        known = notebook_parameters(nb)
        p = {k: v for k, v in (profile.get("common") or {}).items() if k in known}
        for k, v in (profile["steps"][step] or {}).items():
            if k not in known:
                raise DinoregError(f"The profile sets '{k}' for {step}.ipynb, which has no such parameter "
                                   f"(known: {', '.join(sorted(known))}).")
            p[k] = v
        for st, k, v in overrides:
            if st not in (None, step):
                continue
            if k not in known:
                if st is not None:
                    raise DinoregError(f"The override {k} names no parameter of {step}.ipynb.")
                continue
            p[k] = v
        p.update(run_dir=str(run_dir), figures_dir=str(figs), tables_dir=str(tabs))
        resolved[step] = p
    for st, k, _ in overrides:
        if st is None and not any(k in notebook_parameters(notebooks / f"{s}.ipynb") for s in steps):
            raise DinoregError(f"The override {k} names no parameter of any notebook of this profile.")
    return resolved


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def notebook_digest(path: Path) -> str:
    """Hash of the notebook's code cells (markdown, outputs and metadata ignored: they do not change results)."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    return _digest([c.source for c in nb.cells if c.cell_type == "code"])


def shipped_fingerprint() -> list | None:
    """(name, size, mtime) of the shipped dino3d demo weights, or None: part of every step's hash, so weights that
    land (or change) after a run make the next run redo the steps that could have used them."""
    from .evaluation.suite import shipped_weights

    w = shipped_weights()
    if w is None:
        return None
    st = w.stat()
    return [w.name, st.st_size, st.st_mtime_ns]


# ---------------------------------------------------------------------------------------------- one step
def _record_ok(rec_path: Path, h: str) -> dict | None:
    if not rec_path.is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if rec.get("hash") != h:
        return None
    if not all(Path(f).exists() for f in rec.get("outputs", [])):
        return None
    return rec


def run_step(step: str, params: dict, *, h: str, notebooks: Path, kernel: str, log_output: bool) -> dict:
    """Execute ``step`` with papermill into ``run_dir/step.ipynb``; returns its record (raises DinoregError)."""
    import papermill as pm

    run_dir = Path(params["run_dir"])
    src = notebooks / f"{step}.ipynb"
    final, running, failed = (run_dir / f"{step}.ipynb", run_dir / f"{step}.running.ipynb",
                              run_dir / f"{step}.failed.ipynb")
    failed.unlink(missing_ok=True)
    if log_output:  # papermill logs the cells' output on its logger; show it (once) on stderr
        import logging
        import sys

        logger = logging.getLogger("papermill")
        if not any(getattr(h, "_dinoreg", False) for h in logger.handlers):
            h = logging.StreamHandler(sys.stderr)
            h.setFormatter(logging.Formatter("  | %(message)s"))
            h._dinoreg = True
            logger.addHandler(h)
        logger.setLevel(logging.INFO)
    t0 = time.perf_counter()
    try:
        pm.execute_notebook(str(src), str(running), parameters=params, kernel_name=kernel,
                            progress_bar=False, log_output=log_output, report_mode=False,
                            extra_arguments=["--IPKernelApp.log_level=ERROR"])  # no kernel start-up warnings
    except pm.PapermillExecutionError as e:
        os.replace(running, failed)
        reason = " ".join(str(e.evalue).split()).rstrip(".") or e.ename
        raise DinoregError(f"Step {step} failed in notebook {src.name} ({e.ename}: {reason}); the executed notebook "
                           f"with the error is {failed} and the finished steps are kept.") from None
    except Exception as e:  # kernel died, missing kernel, ...
        if running.exists():
            os.replace(running, failed)
        reason = " ".join(str(e).split()).rstrip(".")
        raise DinoregError(f"Step {step} could not run notebook {src.name} ({type(e).__name__}: {reason}); "
                           f"the finished steps are kept.") from None
    os.replace(running, final)
    hand = run_dir / "handoff" / f"{step}.json"
    if not hand.is_file():
        raise DinoregError(f"Step {step} ran but its notebook did not write {hand}; its last cell must save it.")
    info = json.loads(hand.read_text())
    outputs = [str(hand), str(final)] + [str(f) for f in info.get("outputs", [])]
    missing = [f for f in outputs if not Path(f).exists()]
    if missing:
        raise DinoregError(f"Step {step} ran but the output {missing[0]} it lists does not exist.")
    return {"step": step, "hash": h, "parameters": params, "outputs": outputs, "notebook": str(final),
            "seconds": round(time.perf_counter() - t0, 1), "message": info.get("message", ""),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


# ---------------------------------------------------------------------------------------------- the run
def check_run_id(run_id: str) -> str:
    """``run_id`` if it is a plain folder name (letters, digits, then also '-', '_', '.'; at most 64), else
    DinoregError: a run id is joined to ``OUT/runs`` and friends, so '.', '..' or a path must never pass."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise DinoregError(f"The run id {run_id!r} must start with a letter or digit and hold only letters, digits, "
                           f"'-', '_' and '.' (at most 64 characters).")
    return run_id


def reproduce(profile: str, *, out="results", run_id: str | None = None, sets=(), kernel: str = "python3",
              progress: bool = True, log_output: bool = False, notebooks: Path = NOTEBOOKS, force: bool = False,
              fresh: bool = False) -> dict:
    """Run the profile's notebooks in order (see the module docstring); returns the summary dict.

    ``fresh``: after every check passed, delete this run's earlier folders (:func:`clean_run`) and run every step.
    """
    from tqdm.auto import tqdm

    prof = load_profile(profile)
    run_id = check_run_id(run_id or prof["name"])
    out = Path(out).resolve()
    params = resolve(prof, out=out, run_id=run_id, sets=sets, notebooks=notebooks)
    run_dir, figs, tabs = (Path(params[next(iter(params))][k]) for k in INJECTED)
    if fresh:
        clean_run(out, run_id)
    for d in (run_dir, figs, tabs):  # temp files of a run killed while writing (kill -9 cannot be caught)
        sweep_tree(d)
    try:
        for d in (run_dir / "steps", figs, tabs):
            d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DinoregError(f"The output folder {out} cannot be written ({e.strerror or e}).") from None
    resolved = {"profile": prof["name"], "profile_file": prof["_path"], "run_id": run_id,
                "description": prof.get("description", ""), "steps": params}
    write_json_atomic(run_dir / "parameters.json", resolved)
    write_json_atomic(tabs / "parameters.json", resolved)

    t_run = time.perf_counter()
    records, upstream = [], ""
    bar = tqdm(list(params), desc=f"reproduce {prof['name']}", unit="notebook", disable=not progress)
    for step in bar:
        bar.set_postfix_str(step)
        h = _digest({"params": params[step], "notebook": notebook_digest(notebooks / f"{step}.ipynb"),
                     "upstream": upstream, "shipped_weights": shipped_fingerprint()})
        rec_path = run_dir / "steps" / f"{step}.json"
        rec = None if force else _record_ok(rec_path, h)
        if rec is not None:
            rec = dict(rec, status="skipped")
            bar.write(f"{step}: skipped (finished before with the same parameters)")
        else:
            bar.write(f"{step}: running {notebooks / (step + '.ipynb')}")
            rec = run_step(step, params[step], h=h, notebooks=notebooks, kernel=kernel, log_output=log_output)
            write_json_atomic(rec_path, rec)
            rec = dict(rec, status="ran")
            bar.write(f"{step}: done in {rec['seconds']:.0f} s" + (f" — {rec['message']}" if rec["message"] else ""))
        records.append(rec)
        upstream = h
    bar.close()
    summary = {"profile": prof["name"], "run_id": run_id, "run_dir": str(run_dir), "figures_dir": str(figs),
               "tables_dir": str(tabs), "seconds": round(time.perf_counter() - t_run, 1),
               "steps": [{k: r[k] for k in ("step", "status", "seconds", "notebook", "message")} for r in records],
               "figures": sorted(str(p) for p in figs.glob("*.png")),
               "tables": sorted(str(p) for p in tabs.glob("*") if p.suffix in (".csv", ".md"))}
    write_json_atomic(run_dir / "summary.json", summary)
    return summary


def print_summary(s: dict) -> None:
    """What was run and what was written where."""
    print(f"\nreproduce {s['profile']} (run {s['run_id']}): {s['seconds']:.0f} s")
    for r in s["steps"]:
        print(f"  {r['step']:<28}{r['status']:<9}{r['seconds']:>7.0f} s   {r['notebook']}")
    print(f"executed notebooks, data and hand-over files: {s['run_dir']}/")
    print(f"figures ({len(s['figures'])}): {s['figures_dir']}/  " + ", ".join(Path(f).name for f in s["figures"]))
    print(f"tables ({len(s['tables'])}): {s['tables_dir']}/  " + ", ".join(Path(f).name for f in s["tables"]))
    print(f"resolved parameters: {s['tables_dir']}/parameters.json")


def run_folders(out, run_id: str) -> tuple[Path, Path, Path]:
    """``OUT/runs/RUN``, ``OUT/figures/RUN``, ``OUT/tables/RUN`` (``run_id`` checked first)."""
    check_run_id(run_id)
    out = Path(out)
    return out / "runs" / run_id, out / "figures" / run_id, out / "tables" / run_id


def _written_by_run(folder: Path, run_id: str) -> bool:
    """True when ``folder/parameters.json`` is the record :func:`reproduce` writes for run ``run_id``."""
    try:
        rec = json.loads((folder / "parameters.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and rec.get("run_id") == run_id


def clean_run(out, run_id: str) -> list[Path]:
    """Remove the folders an earlier ``reproduce`` of run ``run_id`` wrote under ``out`` (``--fresh``); returns them.

    Safe by construction: the run id is a plain name (:func:`check_run_id`); a folder is removed only when it lies
    inside ``out`` (links resolved), is not itself a link, and its run wrote it (``runs/RUN`` and ``tables/RUN``
    hold the ``parameters.json`` naming this run; ``figures/RUN`` goes with them). A folder of that name not
    written by a run is refused, one sentence, before anything is removed."""
    out = Path(out).resolve()
    folders = run_folders(out, run_id)
    existing = [d for d in folders if os.path.lexists(d)]
    for d in existing:
        if d.is_symlink() or not d.is_dir() or out not in d.resolve().parents:
            raise DinoregError(f"--fresh refuses to remove {d}: it is a link, not a folder, or lies outside --out "
                               f"{out}.")
    run_dir, figs, tabs = folders
    for d in (run_dir, tabs):
        if d in existing and not _written_by_run(d, run_id):
            raise DinoregError(f"--fresh refuses to remove {d}: it holds no parameters.json of run '{run_id}', so "
                               f"dinoreg reproduce did not write it; remove it yourself or choose another --run-id.")
    if figs in existing and run_dir not in existing and tabs not in existing:
        raise DinoregError(f"--fresh refuses to remove {figs}: no record of run '{run_id}' beside it.")
    for d in existing:
        shutil.rmtree(d)
    return existing
