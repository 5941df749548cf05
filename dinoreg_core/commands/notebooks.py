"""``dinoreg notebooks DIR``: copy the notebook suite (shipped inside the package) into a folder to open it."""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import DinoregError


def add_parser(sub) -> None:
    p = sub.add_parser("notebooks", help="copy the notebook suite 00-04 into a folder",
                       description="Copy the notebooks shipped with dinoreg (00_quickstart ... 04_paper_figures) into "
                                   "DIR, to open them in Jupyter. Existing files are kept unless --overwrite.")
    p.add_argument("dir", help="destination folder (created)")
    p.add_argument("--overwrite", action="store_true", help="replace notebooks already in DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..reproduce import NOTEBOOKS

    src = sorted(Path(NOTEBOOKS).glob("*.ipynb"))
    if not src:
        raise DinoregError(f"No notebooks found in {NOTEBOOKS}; reinstall dinoreg.")
    out = Path(args.dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DinoregError(f"The folder {out} cannot be created ({e.strerror or e}).") from None
    copied, kept = [], []
    for f in src:
        dst = out / f.name
        if dst.exists() and not args.overwrite:
            kept.append(f.name)
            continue
        shutil.copyfile(f, dst)
        copied.append(f.name)
    print(f"copied {len(copied)} notebook(s) to {out}" + (f"; kept {len(kept)} existing (use --overwrite)" if kept else ""))
    return 0
