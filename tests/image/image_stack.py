"""What `make image-test` builds its cluster from (the fixtures are in conftest.py): host directories
standing in for volumes, Debian's PostgreSQL, the chart rendered and its pods run with the engine."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import images as im  # noqa: E402
import k8s_tools as kt  # noqa: E402
import podrun  # noqa: E402

DB_PASSWORD = "image-test-db-pw"


def claim_dir(root: Path, name: str) -> Path:
    """A PersistentVolumeClaim as the kubelet presents it with fsGroup 10001: group-owned, setgid, group-writable."""
    d = root / "claims" / name
    d.mkdir(parents=True, exist_ok=True)
    os.chown(d, 0, 10001) if os.geteuid() == 0 else None
    d.chmod(0o2775 if os.geteuid() == 0 else 0o777)
    return d


@dataclass
class Postgres:
    port: int
    uri: str  # the backend-store URI MLflow gets (through the chart's existingSecret)

    def query(self, sql: str) -> str:
        """One value, read with psql over TCP as MLflow's role (what MLflow itself wrote)."""
        proc = subprocess.run([_pg_bin("psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "mlflow", "-d",
                               "mlflow", "-tAc", sql], env={**os.environ, "PGPASSWORD": DB_PASSWORD},
                              capture_output=True, text=True, check=True)
        return proc.stdout.strip()


def _pg_bin(name: str) -> str:
    hits = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if not hits:
        pytest.fail("PostgreSQL is not installed (apt-get install postgresql): make image-test needs it")
    return str(hits[-1])


@dataclass
class Stack:
    """What every rendered pod of a test gets around it."""

    work: Path
    engine: im.Engine
    mlflow_port: int
    postgres: Postgres
    artifacts: Path
    mlflow_health_s: float = 0.0  # how long the MLflow pod took to answer /health

    def values(self, values_file: Path, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """The values file, pointed at this stack: MLflow on the external PostgreSQL, artifacts on a claim."""
        mlflow = {"enabled": True, "port": self.mlflow_port,
                  "backendStore": {"existingSecret": "mlflow-backend"},
                  "artifacts": {"persistence": {"existingClaim": "mlflow-artifacts"}}}
        return kt.deep_merge(kt.deep_merge(kt.values_file(values_file), {"mlflow": mlflow}), extra or {})

    def cluster(self, objects: list[dict[str, Any]], name: str, hosts: dict[str, str] | None = None,
                network: str = "host") -> podrun.Cluster:
        return podrun.Cluster.from_objects(
            objects, self.work / "pods" / name,
            claims={"lora-exp-outputs": claim_dir(self.work, "outputs"),
                    "lora-exp-hf-cache": claim_dir(self.work, "hf-cache"),
                    "mlflow-artifacts": self.artifacts},
            secrets={"mlflow-backend": {"uri": self.postgres.uri}},
            hosts={**self.service_hosts(objects), **(hosts or {})},
            engine=self.engine.name, network=network)

    @staticmethod
    def service_hosts(objects: list[dict[str, Any]]) -> dict[str, str]:
        """Every name cluster DNS gives a rendered Service, all on this host's loopback."""
        hosts = {}
        for svc in kt.by_kind(objects, "Service"):
            name, ns = svc["metadata"]["name"], svc["metadata"]["namespace"]
            for h in (name, f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.svc.cluster.local"):
                hosts[h] = "127.0.0.1"
        return hosts

    def run_job(self, job: dict[str, Any], objects: list[dict[str, Any]], *, index: int | None = None,
                hosts: dict[str, str] | None = None, timeout: float = 1200, network: str = "host"
                ) -> list[podrun.ContainerResult]:
        name = job["metadata"]["name"] + (f"-{index}" if index is not None else "")
        annotations = {} if index is None else {"batch.kubernetes.io/job-completion-index": str(index)}
        return podrun.run_pod([self.engine.name], job, self.cluster(objects, name, hosts, network), pod_name=name,
                              annotations=annotations, timeout=timeout, env={**os.environ, **self.engine.env})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"


def wait_healthy(url: str, timeout: float = 180) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url}/health did not answer 200 within {timeout} s")
