"""values/smoke.yaml (the cluster smoke test) and scripts/kind-e2e.sh."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from k8s_helpers import container, jobs, kt
from lora_exp.config.loading import resolve_runs

SMOKE = kt.REPO / "values" / "smoke.yaml"
SCRIPT = kt.REPO / "scripts" / "kind-e2e.sh"


def test_smoke_values_pass_lora_exp_validate():
    exe = Path(sys.executable).with_name("lora-exp")
    proc = subprocess.run([str(exe), "validate", "-f", str(SMOKE)], capture_output=True, text=True, cwd=kt.REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_smoke_is_tiny_and_cpu_only(render):
    for run in resolve_runs(SMOKE):
        assert 0 < run.spec.training.max_steps <= 10
        assert run.spec.data.max_train_samples and run.spec.data.max_train_samples <= 128
        assert not run.spec.data.data_files  # hub data: nothing to ship into the cluster
    objs = render(kt.values_file(SMOKE), release="smoke")
    for j in jobs(objs):
        res = container(j)["resources"]
        assert "nvidia.com/gpu" not in res["limits"]
        assert j["metadata"]["labels"]["lora-exp.io/profile"] == "cpu"
    # The in-chart MLflow, which the e2e script queries for the run.
    assert kt.by_kind(objs, "Deployment")


def test_kind_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    for needed in ("kind create cluster", "docker build", "kind load docker-image", "helm", "values/smoke.yaml",
                   "status.succeeded", "MlflowClient"):
        assert needed in text, needed


SHELLCHECK = shutil.which("shellcheck") or next(
    (str(p) for p in [kt.REPO / ".venv-scan" / "bin" / "shellcheck"] if p.exists()), None)


@pytest.mark.skipif(not SHELLCHECK, reason="shellcheck not installed (make -f mk/k8s.mk k8s-scan installs it)")
def test_kind_script_shellcheck():
    subprocess.run([SHELLCHECK, str(SCRIPT)], check=True)
