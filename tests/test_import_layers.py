"""The package's imports follow the documented layer order (ARCHITECTURE.md) and hold no cycle.

Every ``import`` / ``from ... import`` of a ``dinoreg_core`` module (function-level ones included) is an edge; a
module may import its own layer or lower ones only, and the module graph must be acyclic.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dinoreg_core"

# lowest first; a module belongs to the first prefix that matches it (longest prefixes are listed where needed)
LAYERS = [
    ("base", ["dinoreg_core", "dinoreg_core.errors", "dinoreg_core.atomic", "dinoreg_core.filters",
              "dinoreg_core.settings", "dinoreg_core.progress", "dinoreg_core.labels", "dinoreg_core.lazy_registry",
              "dinoreg_core.machine"]),
    ("io", ["dinoreg_core.io", "dinoreg_core.export_itk"]),
    ("preprocess", ["dinoreg_core.preprocess"]),
    ("models & data", ["dinoreg_core.models", "dinoreg_core.data"]),
    ("features", ["dinoreg_core.features"]),
    ("registration", ["dinoreg_core.registration"]),
    ("metrics", ["dinoreg_core.evaluation.metrics", "dinoreg_core.evaluation.tables", "dinoreg_core.evaluation.l2r_case"]),
    ("pipeline", ["dinoreg_core.pipeline"]),
    ("peers", ["dinoreg_core.peers"]),
    ("api", ["dinoreg_core.api", "dinoreg_core.demo"]),
    ("ssl & viz", ["dinoreg_core.ssl", "dinoreg_core.viz"]),
    ("workflows", ["dinoreg_core.evaluation", "dinoreg_core.reproduce"]),
    ("commands", ["dinoreg_core.commands", "dinoreg_core.cli"]),
]


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer of ARCHITECTURE.md"
    return rank


def imports(path: Path, modules: set[str], root: Path = PACKAGE.parent) -> set[str]:
    me = module_name(path, root)
    pkg = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("dinoreg_core"):
                continue
            names = {f"{target}.{a.name}" for a in node.names} & modules
            out |= names or {target}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("dinoreg_core")}
    return {m for m in out if m != me}


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: {t for t in imports(p, set(files)) if t in files} for m, p in files.items()}


def test_no_import_against_the_layer_order():
    bad = [f"{m} ({LAYERS[layer_of(m)][0]}) imports {t} ({LAYERS[layer_of(t)][0]})"
           for m, targets in graph().items() for t in targets if layer_of(t) > layer_of(m)]
    assert not bad, "\n".join(sorted(bad))


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(g[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_the_checker_sees_upward_imports(tmp_path):
    """A model module importing features/ and commands/ (relative and absolute) is caught, so green means something."""
    fake = tmp_path / "dinoreg_core" / "models" / "fake.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("from ..features import registry\n\ndef f():\n    import dinoreg_core.commands.demo\n")
    got = imports(fake, {"dinoreg_core.features.registry", "dinoreg_core.commands.demo"}, root=tmp_path)
    assert got == {"dinoreg_core.features.registry", "dinoreg_core.commands.demo"}
    me = module_name(fake, tmp_path)
    assert all(layer_of(t) > layer_of(me) for t in got)
