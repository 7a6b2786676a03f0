"""The images as a cluster would run them (`make image-test`): labels, the restricted security context, an
offline smoke Job (validate init container, then training) tracked by the MLflow image on PostgreSQL, and
a 2-pod torchrun Indexed Job. Every pod is the chart's rendered pod spec (tools/podrun.py), not re-typed."""

from __future__ import annotations

import copy
import json
import threading
import time

import pytest

from image_stack import ROOT, im, kt, podrun

SMOKE = ROOT / "values" / "smoke-offline.yaml"


def labels(engine, ref: str) -> dict[str, str]:
    out = engine.run("image", "inspect", "--format", "{{json .Config.Labels}}", ref, capture=True).stdout
    return json.loads(out)


def test_labels_name_the_base_python_and_versions_actually_used(engine, built):
    record = im.build_record()
    assert record["job"] == built.job and record["mlflow"] == built.mlflow
    for ref, version in ((built.job, im.app_version()), (built.mlflow, im.mlflow_version())):
        lab = labels(engine, ref)
        assert lab["org.opencontainers.image.base.name"] == record["base"], (ref, lab)
        assert lab["org.opencontainers.image.version"] == version
        assert lab["org.opencontainers.image.revision"] == record["sha"]
        # The label states the Python the image really runs.
        out = engine.run("run", "--rm", "--network", "none", "--entrypoint", "python", ref, "-c",
                         "import sys; print('%d.%d' % sys.version_info[:2])", capture=True).stdout.strip()
        assert lab["io.lora-exp.python.version"] == record["python"] == out, (ref, lab, out)
    assert engine.has_image(f"{built.job}-{record['sha'][:12]}")


def _smoke_objects(stack, extra=None):
    return kt.render(stack.values(SMOKE, extra), release="lora-exp")


def test_job_pod_runs_as_uid_10001_on_a_read_only_root(stack, tmp_path):
    """The chart's own container spec (security context, volumes), with a probe instead of the job."""
    objects = _smoke_objects(stack)
    (job,) = kt.by_kind(objects, "Job")
    job = copy.deepcopy(job)
    pod = podrun.pod_template(job)
    pod.pop("initContainers", None)
    probe = ("import os, pathlib\n"
             "print('uid', os.getuid(), 'gid', os.getgid())\n"
             "for d in ['/app', '/opt/venv', '/etc', '/tmp', '/outputs']:\n"
             "    try:\n"
             "        pathlib.Path(d, 'probe').write_text('x'); print('writable', d)\n"
             "    except OSError as e:\n"
             "        print('denied', d, e.errno)\n")
    pod["containers"][0]["args"] = ["python", "-c", probe]
    (res,) = stack.run_job(job, objects, timeout=120)
    assert res.returncode == 0, res.logs
    assert "uid 10001 gid 10001" in res.logs
    for d in ("/app", "/opt/venv", "/etc"):
        assert f"denied {d} 30" in res.logs, res.logs  # EROFS: the root filesystem is read-only
    assert "writable /tmp" in res.logs and "writable /outputs" in res.logs


def test_offline_smoke_job_validates_trains_and_logs_to_mlflow_on_postgresql(stack, prepared_model):
    from mlflow import MlflowClient

    objects = _smoke_objects(stack)
    (job,) = kt.by_kind(objects, "Job")
    t0 = time.monotonic()
    results = stack.run_job(job, objects)
    logs = "\n".join(f"--- {r.name} (exit {r.returncode})\n{r.logs[-6000:]}" for r in results)
    assert [(r.name, r.returncode) for r in results] == [("validate", 0), ("lora-exp", 0)], logs
    print(f"smoke Job: {time.monotonic() - t0:.0f} s; MLflow /health after {stack.mlflow_health_s:.0f} s")
    assert "spec ok" in results[0].logs
    # kubectl-logs style progress: one line per logging step, with loss and throughput.
    assert "loss" in results[1].logs and "samples/s" in results[1].logs
    # The CPU image's job restarts itself on tcmalloc (lora_exp.core.allocator): its memory follows the plan.
    assert "CPU allocator: tcmalloc" in results[1].logs, results[1].logs[-3000:]

    client = MlflowClient(stack.url)
    exp = client.get_experiment_by_name("smoke-offline")
    assert exp is not None, logs
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params.get("method.name", run.data.params.get("method")) is not None, run.data.params
    assert run.data.tags.get("lora_exp.cpu_allocator") == "tcmalloc", run.data.tags
    assert any(k.startswith("train") and "loss" in k for k in run.data.metrics), sorted(run.data.metrics)
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3, "one loss point per step (3 steps)"
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "model")}
    assert "model/adapter_model.safetensors" in arts, arts
    # Served by the MLflow pod onto its artifacts claim, and the run's rows live in PostgreSQL.
    assert list(stack.artifacts.rglob("adapter_model.safetensors"))
    assert stack.postgres.query(f"SELECT count(*) FROM runs WHERE run_uuid = '{run.info.run_id}'") == "1"


def test_two_pod_torchrun_logs_exactly_one_run_with_one_artifact(stack, prepared_model, chart_profile_cpu):
    """The Indexed Job's two pods, each a node with its own loopback address; pod 0's name (from the
    headless Service) resolves to pod 0 in both, as cluster DNS would make it."""
    from mlflow import MlflowClient

    extra = {"profile": "cpu-n2", "profiles": {"cpu-n2": {**chart_profile_cpu, "nodes": 2,
                                                           "description": "2 CPU pods (image-test)"}},
             "experiment": {"name": "smoke-offline-n2"}}
    objects = _smoke_objects(stack, extra)
    (job,) = kt.by_kind(objects, "Job")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
    hosts = {}
    for i in range(2):
        addr = f"127.0.0.{i + 1}"
        hosts[f"{name}-{i}"] = addr
        hosts[f"{name}-{i}.{name}.{ns}.svc.cluster.local"] = addr
    results: dict[int, list[podrun.ContainerResult]] = {}

    def pod(i: int) -> None:
        results[i] = stack.run_job(job, objects, index=i, hosts=hosts)

    threads = [threading.Thread(target=pod, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    logs = "\n".join(f"--- pod {i} {r.name} (exit {r.returncode})\n{r.logs[-5000:]}"
                     for i in range(2) for r in results[i])
    for i in range(2):
        assert [(r.name, r.returncode) for r in results[i]] == [("validate", 0), ("lora-exp", 0)], logs

    client = MlflowClient(stack.url)
    exp = client.get_experiment_by_name("smoke-offline-n2")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    arts = [a.path for a in client.list_artifacts(runs[0].info.run_id, "model")]
    assert arts.count("model/adapter_model.safetensors") == 1, arts
    assert runs[0].info.status == "FINISHED"


@pytest.fixture(scope="module")
def chart_profile_cpu():
    return copy.deepcopy(kt.chart_values()["profiles"]["cpu"])


def test_mlflow_pod_stops_within_dockers_default_10_s(engine, built, postgres, work):
    """Stop time of the chart's MLflow container (2 workers): under Docker's default 10 s, far under k8s' 30 s."""
    from image_stack import Stack, claim_dir, wait_healthy
    from support import free_port

    s = Stack(work=work, engine=engine, mlflow_port=free_port(), postgres=postgres,
              artifacts=claim_dir(work, "mlflow-artifacts"))
    objects = kt.render(s.values(SMOKE), release="stop-test")
    (deploy,) = [d for d in kt.by_kind(objects, "Deployment") if d["metadata"]["name"].endswith("-mlflow")]
    pod = podrun.pod_template(deploy)
    args = podrun.run_args(pod, pod["containers"][0], s.cluster(objects, "stop-test"), pod_name="stop-test")
    engine.run("rm", "-f", "stop-test-mlflow", check=False, capture=True)
    engine.run(args[0], "--detach", *args[1:], capture=True)
    try:
        wait_healthy(s.url)
        from mlflow import MlflowClient

        # A server that has served clients (pooled connections to it and to PostgreSQL), not an idle one.
        client = MlflowClient(s.url)
        run = client.create_run(client.create_experiment("stop-test"))
        for step in range(20):
            client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
        client.set_terminated(run.info.run_id)
        t0 = time.monotonic()
        engine.run("stop", "-t", "30", "stop-test-mlflow", capture=True)
        took = time.monotonic() - t0
        code = engine.run("inspect", "--format", "{{.State.ExitCode}}", "stop-test-mlflow", capture=True).stdout
        print(f"MLflow container stopped in {took:.1f} s, exit {code.strip()}")
        assert took < 10, f"MLflow took {took:.1f} s to stop on SIGTERM"
    finally:
        engine.run("rm", "-f", "stop-test-mlflow", check=False, capture=True)


def test_built_image_prepares_the_offline_model_readable_by_another_uid(prepared_model):
    """prepare-model ran as uid 10002; the training pods (uid 10001) must read every file it wrote."""
    unreadable = [p.name for p in prepared_model.rglob("*") if p.stat().st_mode & 0o004 == 0]
    assert not unreadable, unreadable
