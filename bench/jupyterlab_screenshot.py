"""Screenshot of the LIVE slice viewer in a real JupyterLab, driven by headless Chromium.

What it does:
  1. copies a notebook into a temporary folder (``--notebook``, e.g. notebooks/00_quickstart.ipynb, with optional
     ``--set NAME=VALUE`` parameter overrides added after its ``parameters`` cell, as papermill does); without
     ``--notebook`` it writes a small notebook that registers the demo pair (the real CT warped by a known field)
     with MIND and shows ``SliceViewer.from_result(...).show()``;
  2. starts ``jupyter lab --no-browser --ip 127.0.0.1 --port P --IdentityProvider.token=T`` on that folder, with its
     own settings / workspaces folders (nothing under ~/.jupyter is touched);
  3. opens the notebook in headless Chromium (playwright-python driving the system ``chromium`` through
     ``executable_path``), runs all cells from the Run menu and waits for the viewer's image;
  4. clicks the viewer's controls in the page (label overlay "warped", or "fixed" when "warped" is on; deformation
     grid off and on; one slice up) and checks that the kernel re-rendered the image after each click, i.e. the
     widget is live, not a stored picture;
  5. saves a screenshot of the page with the viewer in view, then closes Chromium and shuts JupyterLab down.

How to run it (not part of CI; needs the [notebooks] extra, playwright and Chromium)::

    apt-get install -y chromium                      # Debian package; as root, so Chromium runs with --no-sandbox
    .venv/bin/pip install -e .[notebooks] playwright  # no `playwright install`: the system Chromium is used
    OMP_NUM_THREADS=1 .venv/bin/python bench/jupyterlab_screenshot.py \
        [--notebook notebooks/00_quickstart.ipynb --set 'methods=["mind"]'] \
        [--out results/figures/jupyterlab_widget.png]

It prints what it did and exits non-zero when the widget did not appear or did not react to a click.
results/figures/jupyterlab_widget.png was made with ``--notebook notebooks/00_quickstart.ipynb --set
'methods = ["mind"]'`` (JupyterLab 4.6, ipywidgets 8.1, Chromium 150, on the 2-core CPU machine; about 2.5 min).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_CELLS = [
    "# The slice viewer, live: the real CT warped by a known field, registered back with MIND\n"
    "from dinoreg_core.api import RegisterConfig, register\n"
    "from dinoreg_core.demo import known_deformation_pair\n"
    "from dinoreg_core.viz.widgets import SliceViewer",
    "pair = known_deformation_pair(max_disp_mm=10.0, seed=0)\n"
    "result = register(pair.fixed, pair.moving, fixed_labels=pair.fixed_labels, moving_labels=pair.moving_labels,\n"
    "                  config=RegisterConfig(features=\"mind\"), label_names=pair.label_names)\n"
    "print({k: round(v, 3) for k, v in result.metrics[\"summary\"].items()})",
    "viewer = SliceViewer.from_result(result, label_names=pair.label_names)\n"
    "viewer.show()",
]
KERNELSPEC = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_demo_notebook(path: Path) -> Path:
    """The small demo notebook (see the module docstring)."""
    import nbformat

    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in DEMO_CELLS])
    nb.metadata["kernelspec"] = KERNELSPEC
    nbformat.write(nb, path)
    return path


def copy_notebook(src: Path, dest: Path, overrides: list[str]) -> Path:
    """Copy ``src`` to ``dest`` with outputs cleared and ``NAME=VALUE`` overrides in a cell after ``parameters``."""
    import nbformat

    nb = nbformat.read(src, as_version=4)
    for c in nb.cells:
        if c.cell_type == "code":
            c.outputs, c.execution_count = [], None
    if overrides:
        at = next((i + 1 for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), 0)
        cell = nbformat.v4.new_code_cell("# overrides from bench/jupyterlab_screenshot.py\n" + "\n".join(overrides))
        nb.cells.insert(at, cell)
    nb.metadata["kernelspec"] = KERNELSPEC
    nbformat.write(nb, dest)
    return dest


def start_jupyterlab(folder: Path, port: int, token: str, home: Path) -> subprocess.Popen:
    """``jupyter lab`` on ``folder`` in its own process group; settings, workspaces and config under ``home``."""
    cfg = home / "config"
    (cfg / "labconfig").mkdir(parents=True, exist_ok=True)
    # no news / update pop-ups over the notebook
    (cfg / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(cfg), JUPYTERLAB_SETTINGS_DIR=str(home / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(home / "workspaces"), JUPYTER_RUNTIME_DIR=str(home / "runtime"),
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.pop("DINOREG_VIZ", None)
    cmd = [str(Path(sys.executable).with_name("jupyter")), "lab", "--no-browser", "--ip", "127.0.0.1", "--port",
           str(port), f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
           "--ServerApp.open_browser=False", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(home / "jupyterlab.log", "w")
    return subprocess.Popen(cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def wait_for_server(port: int, token: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll ``/api/status`` until the server answers."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1.0)
    raise TimeoutError(f"jupyter lab did not answer within {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group we started (jupyter lab and its kernels), SIGKILL after 20 s."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def image_digest(page) -> str:
    """SHA-1 of the viewer image's current ``src`` (a blob URL that changes with every re-render), '' if none."""
    src = page.evaluate("() => { const i = document.querySelector('img.widget-image'); return i ? i.src : ''; }")
    return hashlib.sha1(src.encode()).hexdigest() if src else ""


def wait_for_change(page, before: str, what: str, timeout: float = 60.0) -> str:
    """Wait until the viewer image differs from ``before``; returns the new digest."""
    t0 = time.time()
    while time.time() - t0 < timeout:
        now = image_digest(page)
        if now and now != before:
            print(f"  {what}: the kernel re-rendered the slice ({time.time() - t0:.1f} s)")
            return now
        page.wait_for_timeout(300)
    raise TimeoutError(f"the viewer image did not change after: {what}")


def wait_for_kernel(page, timeout: float = 120.0) -> None:
    """Accept the 'Select Kernel' dialog if JupyterLab asks, then wait until the kernel is idle for 3 s."""
    t0, idle_since = time.time(), None
    while time.time() - t0 < timeout:
        dialog = page.locator(".jp-Dialog")
        if dialog.count() and dialog.first.is_visible():
            print("  accepting the kernel dialog")
            dialog.first.locator("button.jp-mod-accept").click()
            idle_since = None
        elif page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").count():
            idle_since = idle_since or time.time()
            if time.time() - idle_since > 3.0:
                return
        else:
            idle_since = None
        page.wait_for_timeout(500)
    raise TimeoutError("the notebook's kernel did not become idle")


def drive(url: str, out: Path, chromium: str, run_timeout: float) -> None:
    """Open the notebook, run all cells, click the viewer's controls, save the screenshot."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1500, "height": 1000}, device_scale_factor=1)
        try:
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            wait_for_kernel(page)
            print("notebook open, kernel idle; running all cells")
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            page.wait_for_selector(".jp-InputPrompt:has-text('[*]')", timeout=30_000)
            page.wait_for_selector("img.widget-image", timeout=run_timeout * 1000)
            t0 = time.time()
            while page.locator(".jp-InputPrompt:has-text('[*]')").count() and time.time() - t0 < run_timeout:
                page.wait_for_timeout(1000)
            print("all cells ran; the viewer is on the page")
            viewer = page.locator(".widget-hbox:has(img.widget-image)").first
            viewer.scroll_into_view_if_needed()
            digest = image_digest(page)
            labels = viewer.locator(".widget-toggle-buttons").last
            target = "fixed" if labels.locator("button.mod-active", has_text="warped").count() else "warped"
            labels.locator("button", has_text=target).click()
            digest = wait_for_change(page, digest, f"label overlay '{target}'")
            grid = viewer.locator(".widget-checkbox input")
            if grid.is_checked():
                grid.click()
                digest = wait_for_change(page, digest, "deformation grid off")
            grid.click()
            digest = wait_for_change(page, digest, "deformation grid on")
            viewer.locator(".widget-slider .noUi-handle").first.focus()
            page.keyboard.press("ArrowUp")
            wait_for_change(page, digest, "slice slider +1")
            page.wait_for_timeout(1000)
            viewer.scroll_into_view_if_needed()
            page.evaluate("(el) => el.scrollIntoView({block: 'center'})", viewer.element_handle())
            page.wait_for_timeout(500)
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.stem}-tmp.png")
            page.screenshot(path=str(tmp))
            os.replace(tmp, out)
            print(f"wrote {out}")
        except Exception:
            failed = out.with_name(f"{out.stem}-failed.png")
            page.screenshot(path=str(failed))
            print(f"FAILED; the page at that moment: {failed}")
            raise
        finally:
            browser.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--notebook", type=Path, help="notebook to show (default: a small generated demo notebook)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                    help="parameter override added after the notebook's parameters cell (repeatable)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "figures" / "jupyterlab_widget.png")
    ap.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    ap.add_argument("--run-timeout", type=float, default=900.0, help="seconds allowed for running the notebook")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder (notebook, JupyterLab home, log)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="dinoreg-lab-"))
    folder, home = work / "notebooks", work / "home"
    folder.mkdir()
    home.mkdir()
    if args.notebook:
        nb = copy_notebook(args.notebook, folder / args.notebook.name, args.overrides)
    else:
        nb = write_demo_notebook(folder / "slice_viewer_demo.ipynb")
    port, token = free_port(), secrets.token_hex(16)
    ok = False
    try:
        proc = start_jupyterlab(folder, port, token, home)
        try:
            wait_for_server(port, token, proc)
            print(f"jupyter lab on 127.0.0.1:{port} serving {folder}")
            drive(f"http://127.0.0.1:{port}/lab/tree/{nb.name}?token={token}&reset", args.out, args.chromium,
                  args.run_timeout)
            ok = True
        finally:
            stop(proc)
    finally:
        log = home / "jupyterlab.log"
        if not ok and log.exists():  # the folder goes away below: show the end of the server log first
            print("jupyter lab log (last lines):\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
            print(f"jupyter lab stopped; removed {work}")


if __name__ == "__main__":
    main()
