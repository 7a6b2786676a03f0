"""`lora-exp status`: state, progress, loss and ETA of real runs (finished, running, never started) from MLflow;
Jobs and pods from a Kubernetes API. The API is a local HTTP server that serves the Jobs the real chart
renders (helm-python-sdk), with the status a cluster would add, to the real `kubernetes` client."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from lora_exp import cli
from lora_exp.core import errors
from lora_exp.core.errors import PREEMPTED
from support import ROOT, experiment, mlflow_client, toy_rows, write_jsonl, write_values

RELEASE = "rel"
NAMESPACE = "lora-exp"


@pytest.fixture(scope="module")
def store(tiny_gpt2, tmp_path_factory) -> Path:
    """A finished LoRA run of a values file whose other runs ('later', 'long') have not run."""
    from lora_exp.config.loading import resolve_runs
    from lora_exp.engine.fit import train_run as train

    tmp = tmp_path_factory.mktemp("status")
    data = {"train": str(write_jsonl(tmp / "data/train.jsonl", toy_rows(64, seed=1))),
            "validation": str(write_jsonl(tmp / "data/validation.jsonl", toy_rows(16, seed=2)))}
    doc = experiment(tiny_gpt2, data, tmp, runs={
        "lora": {"method": {"name": "lora", "r": 4, "alpha": 8}},
        "later": {"method": {"name": "head_only"}},
        "long": {"training": {"max_steps": 3000, "eval_strategy": "no", "save_strategy": "no",
                              "per_device_train_batch_size": 4}},
    })
    values = write_values(tmp, doc)
    os.environ["LORA_EXP_RELEASE"] = RELEASE
    try:
        train(resolve_runs(values, "lora")[0])
    finally:
        del os.environ["LORA_EXP_RELEASE"]
    return tmp


def _status(capsys, *args: str) -> dict[str, dict[str, Any]]:
    capsys.readouterr()
    assert cli.main(["status", *args, "--json"]) == errors.OK
    return {row["run"]: row for row in json.loads(capsys.readouterr().out)}


def test_finished_and_not_started_runs(store, capsys, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(store / "absent-kubeconfig"))  # no cluster: MLflow columns only
    rows = _status(capsys, "-f", str(store / "values.yaml"), "--run", "lora", "--run", "later")
    client = mlflow_client(store)
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id], "tags.job = 'train'")
    m, lora = run.data.metrics, rows["lora"]
    assert (lora["state"], lora["run_id"], lora["experiment"]) == ("FINISHED", run.info.run_id, "toy")
    assert lora["progress"] == m["progress"] == 1.0
    assert lora["max_steps"] == m["max_steps"] and lora["step"] == m["max_steps"]
    assert lora["loss"] == m["loss"]
    assert lora["eta_seconds"] == 0.0
    assert lora["updated_seconds_ago"] == pytest.approx(time.time() - run.info.end_time / 1000, abs=5)
    assert lora["job_phase"] is None  # no kubeconfig
    assert rows["later"]["state"] == "NOT STARTED" and rows["later"]["run_id"] is None

    capsys.readouterr()
    assert cli.main(["status", "--release", RELEASE, "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["run", "state", "progress", "loss", "eta", "updated", "run", "id"]
    assert table[1].split()[:4] == ["lora", "FINISHED", "100%", f"({int(m['max_steps'])}/{int(m['max_steps'])})"]


def test_running_job_shows_progress_loss_and_eta_then_killed(store, capsys):
    values = store / "values.yaml"
    proc = subprocess.Popen([sys.executable, "-m", "lora_exp", "train", "-f", str(values), "--run", "long"],
                            cwd=store, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        client = mlflow_client(store)
        exp_id = client.get_experiment_by_name("toy").experiment_id

        def long_run():
            found = client.search_runs([exp_id], "tags.\"lora_exp.run\" = 'long'")
            return found[0] if found and "progress" in found[0].data.metrics else None

        deadline = time.monotonic() + 120
        while long_run() is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.2)
        row = _status(capsys, "-f", str(values), "--run", "long", "--kube", "off")["long"]
        run = long_run()
        assert row["state"] == "RUNNING" and row["run_id"] == run.info.run_id
        assert row["max_steps"] == 3000 and 0 < row["step"] < 3000
        assert row["progress"] == pytest.approx(row["step"] / 3000)
        assert row["loss"] in {p.value for p in client.get_metric_history(run.info.run_id, "loss")}
        assert row["step"] in {p.step for p in client.get_metric_history(run.info.run_id, "progress")}
        etas = [p.value for p in client.get_metric_history(run.info.run_id, "eta_seconds")]
        assert 0 < row["eta_seconds"] <= max(etas)  # the logged ETA, counted down since it was logged
        assert row["updated_seconds_ago"] < 60, row
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED
    row = _status(capsys, "-f", str(values), "--run", "long", "--kube", "off")["long"]
    assert row["state"] == "KILLED" and row["eta_seconds"] is None


def test_status_needs_a_selection():
    assert cli.main(["status"]) == errors.USER_ERROR


# --------------------------------------------------------------------------------------------------
# Kubernetes


def _render_jobs(doc: dict[str, Any], release: str, revision: int) -> list[dict[str, Any]]:
    """The Jobs `helm install/upgrade <release> charts/ -f values` creates, rendered by the real chart."""
    helm = pytest.importorskip("helm_python")
    chart = helm.Chart.load(ROOT / "charts")
    rendered = chart.render(doc, name=release, namespace=NAMESPACE, revision=revision, is_install=revision == 1)
    objs = [o for path, text in rendered.items() if not path.endswith("NOTES.txt") for o in yaml.safe_load_all(text)]
    return [o for o in objs if o and o["kind"] == "Job"]


def _pod(job: dict[str, Any], suffix: str, created: str, status: dict[str, Any]) -> dict[str, Any]:
    """A pod of ``job`` as the Job controller creates it: the template plus the job-name label."""
    template = job["spec"]["template"]
    labels = {**template["metadata"]["labels"], "batch.kubernetes.io/job-name": job["metadata"]["name"]}
    return {"apiVersion": "v1", "kind": "Pod", "spec": template["spec"], "status": status,
            "metadata": {"name": f"{job['metadata']['name']}-{suffix}", "namespace": NAMESPACE, "labels": labels,
                         "creationTimestamp": created}}


def _container(state: dict[str, Any], restarts: int = 0) -> dict[str, Any]:
    return {"name": "lora-exp", "ready": "running" in state, "restartCount": restarts, "image": "img",
            "imageID": "", "state": state}


class _FakeApi(BaseHTTPRequestHandler):
    """GET lists of Jobs and Pods, filtered by an equality labelSelector, as the API server answers them."""

    objects: dict[str, list[dict[str, Any]]] = {}
    seen: list[tuple[str, str]] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        url = urlparse(self.path)
        selector = parse_qs(url.query).get("labelSelector", [""])[0]
        self.seen.append((url.path, selector))
        kinds = {f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs": ("batch/v1", "JobList"),
                 f"/api/v1/namespaces/{NAMESPACE}/pods": ("v1", "PodList")}
        if url.path not in kinds:
            self.send_error(404)
            return
        api_version, kind = kinds[url.path]
        wanted = dict(part.split("=", 1) for part in selector.split(",") if part)
        items = [o for o in self.objects[kind] if wanted.items() <= o["metadata"].get("labels", {}).items()]
        body = json.dumps({"apiVersion": api_version, "kind": kind, "metadata": {}, "items": items}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def cluster(store, tmp_path, monkeypatch):
    """Revision 1 and 2 of release 'rel' (this values file) plus another experiment's release, with statuses."""
    pytest.importorskip("kubernetes")
    doc = yaml.safe_load((store / "values.yaml").read_text())
    r1, r2 = _render_jobs(doc, RELEASE, 1), _render_jobs(doc, RELEASE, 2)
    other = _render_jobs({"experiment": {**doc["experiment"], "name": "other"}}, "other-rel", 1)
    job = {(j["metadata"]["annotations"]["lora-exp.io/run-name"], j["metadata"]["labels"]["lora-exp.io/revision"]): j
           for j in r1 + r2}
    for j in r1 + r2 + other:
        j["metadata"]["creationTimestamp"] = "2026-01-01T00:00:00Z"
        j["status"] = {"active": 1}
    job["lora", "1"]["status"] = {"failed": 3, "conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    job["lora", "2"]["status"] = {"active": 1, "failed": 1}
    pods = [
        _pod(job["lora", "2"], "old", "2026-01-01T00:01:00Z", {"phase": "Failed", "containerStatuses": [
            _container({"terminated": {"exitCode": 137, "reason": "OOMKilled"}})]}),
        _pod(job["lora", "2"], "new", "2026-01-01T00:02:00Z", {"phase": "Running", "containerStatuses": [
            _container({"running": {}}, restarts=1)]}),
        _pod(job["later", "2"], "x", "2026-01-01T00:02:00Z", {"phase": "Pending", "containerStatuses": [
            _container({"waiting": {"reason": "ImagePullBackOff"}})]}),
    ]
    _FakeApi.objects = {"JobList": r1 + r2 + other, "PodList": pods}
    _FakeApi.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "test",
        "clusters": [{"name": "test", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "test", "user": {"token": "t"}}],
        "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": NAMESPACE}}],
    }))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    yield _FakeApi
    server.shutdown()
    server.server_close()


def test_release_jobs_and_pods(store, cluster, capsys):
    rows = _status(capsys, "--release", RELEASE, "--tracking-uri", f"sqlite:///{store / 'mlflow.db'}")
    lora, later = rows["lora"], rows["later"]
    assert lora["state"] == "FINISHED"  # from MLflow; the Job is revision 2's, not the failed revision 1
    assert (lora["k8s_job"], lora["job_phase"]) == ("rel-lora-exp-lora-r2", "Running")
    assert (lora["pod"], lora["pod_phase"]) == ("rel-lora-exp-lora-r2-new", "Running")
    assert lora["restarts"] == 2  # one container restart + one failed pod
    assert later["state"] == "NOT STARTED"  # in the cluster, never reached MLflow
    assert (later["job_phase"], later["pod_phase"], later["restarts"]) == ("Running", "Pending (ImagePullBackOff)", 0)
    assert set(rows) == {"lora", "later", "long"}  # every run of the release; nothing of the other release
    assert cluster.seen[0] == (f"/apis/batch/v1/namespaces/{NAMESPACE}/jobs", f"app.kubernetes.io/instance={RELEASE}")
    assert (f"/api/v1/namespaces/{NAMESPACE}/pods", "batch.kubernetes.io/job-name=rel-lora-exp-lora-r2") in cluster.seen


def test_values_file_jobs_across_releases(store, cluster, capsys):
    rows = _status(capsys, "-f", str(store / "values.yaml"), "--run", "lora", "--run", "later")
    assert cluster.seen[0][1] == "app.kubernetes.io/part-of=lora-exp"  # any release of this experiment
    assert rows["lora"]["job_phase"] == "Running" and rows["later"]["pod_phase"] == "Pending (ImagePullBackOff)"
    assert set(rows) == {"lora", "later"}  # the runs asked for; not 'long', nor the other experiment's Jobs


def test_job_phases():
    pytest.importorskip("kubernetes")
    from kubernetes.client import V1Job, V1JobCondition, V1JobStatus

    from lora_exp.reports.status import job_phase

    def job(active: int = 0, **conditions: str) -> V1Job:
        conds = [V1JobCondition(type=t, status="True", reason=r or None) for t, r in conditions.items()]
        return V1Job(status=V1JobStatus(active=active, conditions=conds))

    assert job_phase(job(Complete="")) == "Complete"
    assert job_phase(job(Failed="BackoffLimitExceeded")) == "Failed (BackoffLimitExceeded)"
    assert job_phase(job(Suspended="JobSuspended")) == "Suspended"  # e.g. queued by Kueue
    assert job_phase(job(active=1)) == "Running" and job_phase(job()) == "Pending"
