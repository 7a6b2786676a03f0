"""The layer contracts of `make lint` (import-linter, pyproject.toml) hold, and break on an upward import:
a copy of the package with one injected import, at module level or hidden inside a function, fails them."""

from __future__ import annotations

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
    ("tasks/glue.py", "def _hidden():\n    from lora_exp.runtime import fit  # noqa\n",
     "lora_exp.tasks.glue -> lora_exp.runtime.fit"),
    ("pipelines/train.py", "from lora_exp.pipelines import distill  # noqa\n",
     "lora_exp.pipelines.train -> lora_exp.pipelines.distill"),
])
def test_an_upward_import_breaks_the_contracts(package_copy, module, line, edge):
    path = package_copy / "jobs" / "lora_exp" / module
    path.write_text(path.read_text() + "\n" + line)
    proc = _lint(package_copy)
    assert proc.returncode != 0
    assert edge in proc.stdout, proc.stdout[-3000:]
