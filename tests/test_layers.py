"""The layer contracts of `make lint` (import-linter, pyproject.toml) hold, and break on an upward import:
a copy of the package with one injected import, at module level or hidden inside a function, fails them."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def _lint(tmp: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(tmp / "jobs"), "PATH": "/usr/bin:/bin"}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(tmp / "pyproject.toml"), "--no-cache"], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def package_copy(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "jobs" / "lora_exp", tmp_path / "jobs" / "lora_exp",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def test_the_package_keeps_its_layers(package_copy):
    proc = _lint(package_copy)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


@pytest.mark.parametrize(("module", "line", "edge"), [
    ("core/errors.py", "from lora_exp.cli import main  # noqa\n", "lora_exp.core.errors -> lora_exp.cli"),
    ("tasks/glue.py", "def _hidden():\n    from lora_exp.engine import fit  # noqa\n",
     "lora_exp.tasks.glue -> lora_exp.engine.fit"),
    ("pipelines/export.py", "from lora_exp.pipelines import distill  # noqa\n",
     "lora_exp.pipelines.export -> lora_exp.pipelines.distill"),
    ("reports/status.py", "def _hidden():\n    from lora_exp.engine import trainer  # noqa\n",
     "lora_exp.reports.status -> lora_exp.engine.trainer"),  # reports: the read side, nothing of training
    ("tracking/server.py", "from lora_exp.engine import models  # noqa\n",
     "lora_exp.tracking.server -> lora_exp.engine.models"),
])
def test_an_upward_import_breaks_the_contracts(package_copy, module, line, edge):
    path = package_copy / "jobs" / "lora_exp" / module
    path.write_text(path.read_text() + "\n" + line)
    proc = _lint(package_copy)
    assert proc.returncode != 0
    assert edge in proc.stdout, proc.stdout[-3000:]


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, every import statement counted (inside functions too);
    what runs only for the type checker (``if TYPE_CHECKING:``) is not an import that runs."""
    root = ROOT / "jobs" / "lora_exp"
    modules = {("lora_exp." + ".".join(f.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): f
               for f in root.rglob("*.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING", "typing.TYPE_CHECKING") for n in ast.walk(node)}
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lora_exp"):
                names = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names if a.name.startswith("lora_exp")]
            for name in names:
                target = resolve(name)
                if target and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back_inside_functions_included():
    graph = import_graph()
    assert "lora_exp.engine.trainer" in graph["lora_exp.engine.fit"]  # the graph sees real edges
    assert cycles(graph) == []
    graph["lora_exp.engine.models"].add("lora_exp.engine.fit")  # and a planted one is found
    assert any({"lora_exp.engine.fit", "lora_exp.engine.models"} <= set(c) for c in cycles(graph))


def test_the_bottom_layer_has_no_side_doors_and_plugins_load_from_the_top():
    """core holds the registries but imports no plugin: the CLI's plugins.load does, by plain imports."""
    for path in (ROOT / "jobs" / "lora_exp" / "core").glob("*.py"):
        assert "importlib" not in path.read_text(), path.name
    plugins = (ROOT / "jobs" / "lora_exp" / "plugins.py").read_text()
    assert "import lora_exp.methods" in plugins and "import lora_exp.tasks" in plugins
    graph = import_graph()
    assert {"lora_exp.methods", "lora_exp.tasks", "lora_exp.formulations"} <= graph["lora_exp.plugins"]
    assert "lora_exp.plugins" in graph["lora_exp.cli"]


def test_registries_are_unreadable_until_the_plugins_load():
    code = ("from lora_exp.core import registry\n"
            "try:\n    registry.METHODS.names()\nexcept RuntimeError as e:\n    print('refused:', e)\n"
            "from lora_exp import plugins\nplugins.load()\nprint(sorted(registry.METHODS.names()))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT / "jobs"), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    assert "refused: lora-exp's plugin registries are not loaded yet" in proc.stdout
    loaded = set(ast.literal_eval(proc.stdout.strip().splitlines()[-1]))
    assert {"full", "head_only", "lora", "qlora"} <= loaded, loaded


def test_module_sizes_stay_readable():
    """The engine under 2,000 lines, no module over 500 (issue 22): a folder says what it holds."""
    root = ROOT / "jobs" / "lora_exp"
    sizes = {p: len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    assert sum(n for p, n in sizes.items() if p.parent.name == "engine") < 2000
    assert {str(p.relative_to(root)): n for p, n in sizes.items() if n > 500} == {}
