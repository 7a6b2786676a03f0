"""Fixtures of `make image-test`: the built images, a real PostgreSQL, the MLflow image on it, and the
chart's rendered pods run with the container engine (tools/podrun.py).

These tests need a working container engine and the images `make image` builds; `make test` skips them
(they run when LORA_EXP_IMAGE_TEST=1, which `make image-test` sets). Under image-test a missing engine or
image fails rather than skips: the point is to prove they work.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import images as im  # noqa: E402
import k8s_tools as kt  # noqa: E402
import podrun  # noqa: E402

ENABLED = os.environ.get("LORA_EXP_IMAGE_TEST") == "1"
DB_PASSWORD = "image-test-db-pw"


def pytest_collection_modifyitems(config, items):
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="needs the built images and a container engine: make image && make image-test")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def engine() -> im.Engine:
    try:
        return im.engine()
    except im.EngineUnavailable as e:
        pytest.fail(str(e))


@pytest.fixture(scope="session")
def built(engine) -> im.Images:
    imgs = im.images()
    for ref in (imgs.job, imgs.mlflow):
        assert engine.has_image(ref), f"image {ref} is not built: run make image"
    return imgs


@pytest.fixture(scope="session")
def work() -> Iterator[Path]:
    """Host directories standing in for the cluster's volumes: a directory of our own, traversable by the
    pods' uids (pytest's own temp root is 0700, and nothing above it is ours to loosen)."""
    d = Path(tempfile.mkdtemp(prefix="lora-exp-image-test-"))
    d.chmod(0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)  # files of other uids are left only when not root


def claim_dir(root: Path, name: str) -> Path:
    """A PersistentVolumeClaim as the kubelet presents it with fsGroup 10001: group-owned, setgid, group-writable."""
    d = root / "claims" / name
    d.mkdir(parents=True, exist_ok=True)
    os.chown(d, 0, 10001) if os.geteuid() == 0 else None
    d.chmod(0o2775 if os.geteuid() == 0 else 0o777)
    return d


# ------------------------------------------------------------------------------------------------
# PostgreSQL from Debian, on loopback


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


@pytest.fixture(scope="session")
def postgres(work) -> Iterator[Postgres]:
    data, sock = work / "pgdata", work / "pgsock"
    data.mkdir()
    sock.mkdir()
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the server as Debian's postgres user
        shutil.chown(data, "postgres", "postgres")
        shutil.chown(sock, "postgres", "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    superuser = "postgres" if as_user else getpass.getuser()
    port = free_port()
    subprocess.run([*as_user, _pg_bin("initdb"), "-D", str(data), "-U", superuser, "--auth-local=trust",
                    "--auth-host=scram-sha-256"], check=True, capture_output=True)
    log = sock / "postgres.log"  # a directory the server user owns
    subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-o",
                    f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sock}", "start"],
                   check=True, capture_output=True)
    psql = [*as_user, _pg_bin("psql"), "-h", str(sock), "-p", str(port), "-U", superuser, "-v", "ON_ERROR_STOP=1",
            "-d", "postgres"]
    try:
        subprocess.run([*psql, "-c", f"CREATE ROLE mlflow LOGIN PASSWORD '{DB_PASSWORD}'"], check=True,
                       capture_output=True)
        subprocess.run([*psql, "-c", "CREATE DATABASE mlflow OWNER mlflow"], check=True, capture_output=True)
        yield Postgres(port, f"postgresql+psycopg2://mlflow:{DB_PASSWORD}@127.0.0.1:{port}/mlflow")
    finally:
        subprocess.run([*as_user, _pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)


# ------------------------------------------------------------------------------------------------
# The chart, rendered for the engine


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


@pytest.fixture(scope="session")
def stack(engine, built, postgres, work) -> Iterator[Stack]:
    """The chart's MLflow Deployment, run from the MLflow image against the PostgreSQL above."""
    artifacts = claim_dir(work, "mlflow-artifacts")
    s = Stack(work=work, engine=engine, mlflow_port=free_port(), postgres=postgres, artifacts=artifacts)
    objects = kt.render(s.values(ROOT / "values" / "smoke-offline.yaml"), release="lora-exp")
    (deploy,) = [d for d in kt.by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-mlflow")]
    pod = podrun.pod_template(deploy)
    (container,) = pod["containers"]
    cluster = s.cluster(objects, "mlflow")
    name = "lora-exp-mlflow"
    engine.run("rm", "-f", f"{name}-mlflow", check=False, capture=True)
    args = podrun.run_args(pod, container, cluster, pod_name=name)
    engine.run(args[0], "--detach", *args[1:], capture=True)
    try:
        s.mlflow_health_s = wait_healthy(s.url)
        yield s
    finally:
        logs = engine.run("logs", f"{name}-mlflow", check=False, capture=True)
        (work / "mlflow.log").write_text(logs.stdout + logs.stderr)
        engine.run("stop", "-t", "60", f"{name}-mlflow", check=False, capture=True)
        engine.run("rm", "-f", f"{name}-mlflow", check=False, capture=True)


@pytest.fixture(scope="session")
def prepared_model(stack) -> Path:
    """k8s/prepare-model.yaml's Job, run as another uid (10002) than the Jobs' (10001): the files it writes
    must still be readable by the training pods on the shared claim."""
    import yaml

    docs = [d for d in yaml.safe_load_all((ROOT / "k8s" / "prepare-model.yaml").read_text()) if d]
    (job,) = [d for d in docs if d["kind"] == "Job"]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"] and "egress" not in policy["spec"]
    job["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 10002
    results = stack.run_job(job, [job], network="none")  # its NetworkPolicy denies all traffic: no network
    assert results[-1].returncode == 0, results[-1].logs[-4000:]
    model = stack.work / "claims" / "hf-cache" / "models" / "smollm2-135m-instruct"
    assert (model / "model.safetensors").is_file()
    return model
