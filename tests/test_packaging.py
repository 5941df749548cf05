"""Packaging conventions: environment.yml agrees with pyproject.toml, the wheel's package list covers every
package folder, outputs honour the umask, the demo's data discovery, the notebooks a wheel ships."""

from __future__ import annotations

import os
import re
import stat
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from dinoreg_core import atomic
from dinoreg_core.cli import main
from dinoreg_core.demo import DEMO_CT_NAME, find_demo_ct
from dinoreg_core.errors import DinoregError

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"build": "python-build", "simpleitk": "simpleitk"}  # pip name -> conda-forge name where they differ


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _env_specs() -> dict[str, str]:
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    specs = {}
    for dep in env["dependencies"]:
        items = dep["pip"] if isinstance(dep, dict) else [dep]
        for item in items:
            if item.startswith("-e") or item.startswith("python="):
                continue
            m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", item)
            specs[_norm(m.group(1))] = m.group(2).strip()
    return specs


def test_environment_yml_has_every_dependency_with_the_pyproject_floor():
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(proj["dependencies"]) + proj["optional-dependencies"]["dev"] + proj["optional-dependencies"]["notebooks"]
    env = _env_specs()
    missing, mismatched = [], []
    for r in map(Requirement, reqs):
        name = _norm(r.name)
        key = name if name in env else _norm(CONDA_NAMES.get(name, name))
        if key not in env:
            missing.append(r.name)
            continue
        spec = env[key]
        if spec.startswith("=="):  # an exact pin must satisfy the project's range (torch's CPU build)
            if not r.specifier.contains(spec[2:], prereleases=True):
                mismatched.append(f"{r.name}: {spec} outside {r.specifier}")
        elif {str(s) for s in Requirement("x" + spec).specifier} != {str(s) for s in r.specifier}:
            mismatched.append(f"{r.name}: environment.yml '{spec}' vs pyproject '{r.specifier}'")
    assert not missing, f"missing from environment.yml: {missing}"
    assert not mismatched, mismatched


def test_wheel_package_list_covers_every_package_folder():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "dinoreg_core").rglob("__init__.py")}
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"
    assert cfg["package-dir"]["dinoreg_core.notebooks"] == "notebooks"
    shipped = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert shipped[:2] == ["00_quickstart.ipynb", "01_pretrain_3d_dino.ipynb"] and len(shipped) == 5


@pytest.mark.parametrize("mask,expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_atomic_writes_honour_the_umask(tmp_path, mask, expected):
    old = os.umask(mask)
    try:
        assert atomic.current_umask() == mask
        p = tmp_path / "a.json"
        atomic.write_json_atomic(p, {"x": 1})
        assert stat.S_IMODE(p.stat().st_mode) == expected
    finally:
        os.umask(old)


def test_atomic_replace_keeps_the_existing_mode(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("old")
    os.chmod(p, 0o640)
    atomic.write_text_atomic(p, "new")
    assert p.read_text() == "new" and stat.S_IMODE(p.stat().st_mode) == 0o640


def test_demo_data_discovery(tmp_path, monkeypatch):
    real = tmp_path / "shared" / "real"
    real.mkdir(parents=True)
    ct = real / DEMO_CT_NAME
    ct.write_bytes(b"")
    assert find_demo_ct(str(ct))[0] == ct
    assert find_demo_ct(str(real))[0] == ct
    assert find_demo_ct(str(tmp_path / "shared"))[0] == ct
    with pytest.raises(DinoregError, match="holds no"):
        find_demo_ct(str(tmp_path))
    monkeypatch.setenv("DINOREG_SHARED_DATA", str(tmp_path / "shared"))
    assert find_demo_ct()[0] == ct
    monkeypatch.setenv("DINOREG_SHARED_DATA", str(tmp_path / "nowhere"))
    found, tried = find_demo_ct()
    assert tried[0] == str(tmp_path / "nowhere" / DEMO_CT_NAME)


def test_notebooks_command_copies_the_suite(tmp_path, capsys):
    assert main(["notebooks", str(tmp_path / "nb")]) == 0
    assert sorted(p.name for p in (tmp_path / "nb").glob("*.ipynb")) == sorted(
        p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    (tmp_path / "nb" / "00_quickstart.ipynb").write_text("mine")
    assert main(["notebooks", str(tmp_path / "nb")]) == 0
    assert (tmp_path / "nb" / "00_quickstart.ipynb").read_text() == "mine" and "kept 5" in capsys.readouterr().out
