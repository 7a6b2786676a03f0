"""The tracker never costs a run: a real `mlflow server` on loopback is stopped mid-run for longer than the
client's retry budget (1 retry, 1 s back-off: lora_exp.tracking.server.CLIENT_DEFAULTS) and training keeps
its pace; when the server is back every metric and artifact reaches it. A server still down at the end leaves
the results on disk, exit 75, and the next attempt only uploads. An unreachable server is known in seconds,
before any model loads. Two jobs starting together on a fresh local store both finish."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pytest

from lora_exp.core.errors import TRACKER_UNAVAILABLE
from support import Job, experiment, free_port, run_cli, write_values

pytestmark = pytest.mark.slow
PROGRESS = re.compile(r"^(\S+) INFO lora_exp.progress: step (\d+)/(\d+) .*\| ([\d.]+) samples/s")



class Server:
    """`mlflow server` on a fixed loopback port and store, which can be stopped and started again."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = f"sqlite:///{tmp / 'server.db'}"
        self.artifacts = tmp / "server-artifacts"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        mlflow_bin = Path(sys.executable).parent / "mlflow"
        self.proc = subprocess.Popen(
            [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", self.store, "--serve-artifacts", "--artifacts-destination", str(self.artifacts)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 120
        while not self.healthy():
            assert self.proc.poll() is None and time.monotonic() < deadline, "mlflow server did not start"
            time.sleep(0.3)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a crash, not a graceful stop
            self.proc.wait(30)
        self.proc = None


@pytest.fixture
def server(tmp_path):
    s = Server(tmp_path)
    s.start()
    yield s
    s.stop()


def _values(tmp: Path, tiny_gpt2, toy_data, max_steps: int) -> Path:
    doc = experiment(tiny_gpt2, toy_data, tmp, training={
        "max_steps": max_steps, "logging_steps": 1, "per_device_train_batch_size": 4, "learning_rate": 1e-3,
        "eval_strategy": "no", "save_strategy": "no"}, runs={"lora": {"method": {"name": "lora", "r": 2}}})
    del doc["experiment"]["defaults"]["tracking"]  # the URI comes from the environment, as in a pod
    return write_values(tmp, doc)


def _progress(log: str) -> list[tuple[float, int, float]]:
    """(time, step, samples/s) of each progress line."""
    out = []
    for line in log.splitlines():
        m = PROGRESS.match(line)
        if m:
            out.append((datetime.fromisoformat(m[1]).timestamp(), int(m[2]), float(m[4])))
    return out


def _check_server_has_everything(url: str, steps: int) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=url)
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.r"] == "2" and "validation_accuracy" in run.data.metrics
    logged = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert logged == list(range(1, steps + 1))  # every step, once
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {
        Path(f.path).name for f in client.list_artifacts(run.info.run_id, "model")}
    assert {"predictions.csv", "results.json"} <= {
        Path(f.path).name for f in client.list_artifacts(run.info.run_id, "eval/validation")}


def test_training_keeps_its_pace_through_an_outage_and_everything_arrives(server, tmp_path, tiny_gpt2, toy_data):
    steps, outage_s = 3000, 25.0
    job = Job(_values(tmp_path, tiny_gpt2, toy_data, steps), tmp_path,
              {"MLFLOW_TRACKING_URI": server.url, "LORA_EXP_TRACKING_DEADLINE": "180", "OMP_NUM_THREADS": "1"})
    assert job.wait_for(f"step 200/{steps} ")
    time.sleep(2.5)  # progress lines (second resolution) before the outage, however fast the first steps ran
    down = time.time()
    server.stop()
    time.sleep(outage_s)
    up = time.time()
    assert job.proc.poll() is None, "training ended during the outage: make it longer"
    server.start()
    assert job.proc.wait(600) == 0, job.log[-4000:]
    assert "unreachable" in job.log and "reachable again" in job.log

    points = _progress(job.log)
    before = [rate for t, _, rate in points if t < down - 1]
    during = [(t, rate) for t, _, rate in points if down + 1 < t < up - 1]
    assert len(during) > 100, "training stalled while the server was down"
    assert statistics.median(r for _, r in during) >= 0.5 * statistics.median(before)
    gaps = [b[0] - a[0] for a, b in zip(during, during[1:], strict=False)]
    assert max(gaps) < 3.0  # no step waited on the tracker
    assert not (tmp_path / "mlflow.db").exists()
    _check_server_has_everything(server.url, steps)


def test_server_down_at_the_end_exits_75_and_the_next_attempt_only_uploads(server, tmp_path, tiny_gpt2, toy_data):
    steps = 300
    values = _values(tmp_path, tiny_gpt2, toy_data, steps)
    env = {"MLFLOW_TRACKING_URI": server.url, "LORA_EXP_TRACKING_DEADLINE": "5"}
    job = Job(values, tmp_path, env)
    assert job.wait_for(f"step 100/{steps} ")
    server.stop()
    assert job.proc.wait(600) == TRACKER_UNAVAILABLE, job.log[-4000:]
    out = tmp_path / "outputs" / "toy" / "lora"
    assert (out / "metrics.json").exists() and (out / "final" / "adapter_model.safetensors").exists()

    server.start()
    again = run_cli("train", "-f", str(values), cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stdout[-4000:]
    assert "uploading what did not reach MLflow" in again.stdout
    assert "lora_exp.progress: training: " not in again.stdout  # nothing was trained again
    _check_server_has_everything(server.url, steps)


def test_an_unreachable_server_fails_in_seconds_before_any_model_loads(tmp_path, tiny_gpt2, toy_data):
    values = _values(tmp_path, tiny_gpt2, toy_data, 10)
    t0 = time.monotonic()
    proc = run_cli("train", "-f", str(values), cwd=tmp_path,
                   env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    elapsed = time.monotonic() - t0
    assert proc.returncode == TRACKER_UNAVAILABLE, proc.stdout[-3000:]
    assert elapsed < 15, elapsed
    assert "does not answer" in proc.stdout and "parameters:" not in proc.stdout  # no model was loaded
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize("attempt", range(3))
def test_two_jobs_on_a_fresh_local_store_both_finish(attempt, tmp_path, tiny_gpt2, toy_data):
    store = tmp_path / "store" / "mlflow.db"
    jobs = []
    for name in ("a", "b"):
        doc = experiment(tiny_gpt2, toy_data, tmp_path / name, training={"max_steps": 3, "eval_strategy": "no",
                                                                         "save_strategy": "no"})
        doc["experiment"]["defaults"]["tracking"] = {"tracking_uri": f"sqlite:///{store}"}
        (tmp_path / name).mkdir()
        jobs.append(Job(write_values(tmp_path / name, doc), tmp_path / name, {}))
    for job in jobs:
        assert job.proc.wait(600) == 0, job.log[-4000:]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]


def test_credentials_in_a_tracking_uri_appear_nowhere(server, tmp_path, tiny_gpt2, toy_data):
    """A user:password in the URI reaches the server (basic auth) but no log line, param, tag or file."""
    from mlflow import MlflowClient

    secret = "s3cret-pw-4711"
    uri = server.url.replace("http://", f"http://alice:{secret}@")
    values = _values(tmp_path, tiny_gpt2, toy_data, 5)
    proc = run_cli("train", "-f", str(values), "--set", f"tracking.tracking_uri={uri}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert secret not in proc.stdout + proc.stderr
    leaked = [p for p in (tmp_path / "outputs").rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not leaked
    client = MlflowClient(tracking_uri=server.url)
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert run.data.params["tracking.tracking_uri"] == server.url.replace("http://", "http://***@")
    assert secret not in str(run.data.params) + str(run.data.tags)
    spec = Path(client.download_artifacts(run.info.run_id, "spec.yaml", str(tmp_path / "dl"))).read_text()
    assert secret not in spec and "***@" in spec
