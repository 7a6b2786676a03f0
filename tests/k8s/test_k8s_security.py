"""Across every template: Pod Security "restricted", secrets only by reference, no API token."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from k8s_helpers import VALUES_FILES, kt, pod_specs, synthetic, values_id

SECRETISH = re.compile(r"(PASSWORD|TOKEN|SECRET|ACCESS_KEY|CREDENTIAL|API_KEY)", re.I)
URI_WITH_PASSWORD = re.compile(r"://[^/@\s:]+:[^/@\s]+@")

EVERYTHING_ON = synthetic(
    profile="h100-80g-x8-n2",
    hf={"existingSecret": "hf"},
    airGapped=True,
    mlflow={"enabled": True, "postgresql": {"existingSecret": "db"},
            "auth": {"enabled": True, "existingSecret": "admin"},
            "artifacts": {"destination": "s3://b/p", "s3": {"existingSecret": "s3", "endpointUrl": "http://minio:9000"}}},
)


def renders(render):
    yield "everything-on", render(EVERYTHING_ON)
    yield "mlflow-pvc", render(synthetic(mlflow={"enabled": True, "postgresql": {"existingSecret": "db"}}))
    for path in VALUES_FILES:
        yield path.name, render(kt.values_file(path), release=path.stem)


def test_pod_security_restricted(render):
    for label, objs in renders(render):
        for owner, pod in pod_specs(objs):
            where = f"{label}: {owner}"
            assert pod.get("automountServiceAccountToken") is False, where
            assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC"), where
            sc = pod["securityContext"]
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0, where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            for v in pod.get("volumes", []):
                assert "hostPath" not in v, where
            for c in pod.get("initContainers", []) + pod["containers"]:
                csc = c["securityContext"]
                assert csc["allowPrivilegeEscalation"] is False, where
                assert csc["readOnlyRootFilesystem"] is True, where
                assert csc["capabilities"]["drop"] == ["ALL"] and "add" not in csc["capabilities"], where
                assert csc.get("privileged") in (None, False), where
                assert "hostPort" not in str(c.get("ports", "")), where
                assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["memory"], where


def test_no_inline_secret_values(render):
    for label, objs in renders(render):
        assert not kt.by_kind(objs, "Secret"), f"{label}: the chart must not create Secrets"
        for owner, pod in pod_specs(objs):
            for c in pod.get("initContainers", []) + pod["containers"]:
                for e in c.get("env", []):
                    if SECRETISH.search(e["name"]):
                        assert "value" not in e, f"{label}: {owner} {e['name']} is inline"
                        assert "secretKeyRef" in e["valueFrom"], f"{label}: {owner} {e['name']}"
                    assert not URI_WITH_PASSWORD.search(e.get("value", "")), f"{label}: {owner} {e['name']}"
                for a in c.get("args", []) + c.get("command", []):
                    assert not URI_WITH_PASSWORD.search(a) and not SECRETISH.search(a.split("=")[0]), a
        for cm in kt.by_kind(objs, "ConfigMap"):
            for key, text in cm["data"].items():
                assert not URI_WITH_PASSWORD.search(text), f"{label}: {cm['metadata']['name']}/{key}"
                assert not re.search(r"(?im)^\s*admin_password\s*=", text)


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
def test_values_files_hold_no_secrets(path: Path):
    text = path.read_text()
    assert not URI_WITH_PASSWORD.search(text)
    assert not re.search(r"(?im)^\s*(password|passwd|token|secret|api_?key|access_?key)\s*:\s*\S", text), (
        "secrets belong in Secrets (referenced with existingSecret)")
