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
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from image_stack import (  # noqa: E402
    DB_PASSWORD,
    ROOT,
    Postgres,
    Stack,
    _pg_bin,
    claim_dir,
    im,
    kt,
    podrun,
    wait_healthy,
)
from support import free_port  # noqa: E402

ENABLED = os.environ.get("LORA_EXP_IMAGE_TEST") == "1"


def pytest_collection_modifyitems(config, items):
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="needs the built images and a container engine: make image && make image-test")
    for item in items:
        if Path(str(item.fspath)).is_relative_to(Path(__file__).parent):
            item.add_marker(skip)



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


# ------------------------------------------------------------------------------------------------
# PostgreSQL from Debian, on loopback


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
