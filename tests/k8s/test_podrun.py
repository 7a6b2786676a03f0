"""tools/podrun.py: the engine's `run` arguments come from the rendered manifest, so `make image-test` runs
what a cluster would. These need no engine: they check the translation on the chart's real renders."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import podrun
from k8s_helpers import kt

SMOKE = kt.REPO / "values" / "smoke-offline.yaml"


def _job(extra=None):
    values = kt.deep_merge(kt.values_file(SMOKE), extra or {})
    objects = kt.render(values)
    (job,) = kt.by_kind(objects, "Job")
    return objects, job


def _cluster(objects, tmp_path, **kw):
    claims = {"lora-exp-outputs": tmp_path / "out", "lora-exp-hf-cache": tmp_path / "hf"}
    return podrun.Cluster.from_objects(objects, tmp_path / "scratch", claims=claims, **kw)


def _opt(args, flag):
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_job_container_keeps_the_charts_security_context_and_command(tmp_path):
    objects, job = _job()
    pod = podrun.pod_template(job)
    main = pod["containers"][0]
    args = podrun.run_args(pod, main, _cluster(objects, tmp_path), pod_name="p")
    assert _opt(args, "--user") == ["10001:10001"] and _opt(args, "--group-add") == ["10001"]
    assert "--read-only" in args and "--read-only-tmpfs=false" in args
    assert _opt(args, "--cap-drop") == ["ALL"] and _opt(args, "--security-opt") == ["no-new-privileges"]
    assert "--image-volume" in args  # the image's VOLUME lines give nothing a cluster would not
    image_at = args.index(main["image"])
    assert [*_opt(args, "--entrypoint"), *args[image_at + 1:]] == main["command"] + main["args"]
    assert _opt(args, "--memory") == _opt(args, "--memory-swap") == [str(3 * 1024**3)]
    assert _opt(args, "--shm-size") == [str(512 * 1024**2)]
    assert _opt(args, "--stop-timeout") == [str(pod["terminationGracePeriodSeconds"])]
    env = podrun.read_env_file(args)
    assert env["HF_HUB_OFFLINE"] == "1" and env["MLFLOW_TRACKING_URI"].startswith("http://")
    assert "--env" not in args  # values travel in a 0600 env file, never on the command line
    assert Path(_opt(args, "--env-file")[0]).stat().st_mode & 0o077 == 0


def test_volumes_follow_the_mounts(tmp_path):
    objects, job = _job()
    pod = podrun.pod_template(job)
    args = podrun.run_args(pod, pod["containers"][0], _cluster(objects, tmp_path), pod_name="p")
    mounts = {v.split(":")[1]: v for v in _opt(args, "--volume")}
    assert mounts["/outputs"] == f"{tmp_path / 'out'}:/outputs:rw"
    assert mounts["/hf-cache"] == f"{tmp_path / 'hf'}:/hf-cache:rw"
    assert mounts["/etc/lora-exp"].endswith(":ro")  # ConfigMaps are read-only
    spec_dir = mounts["/etc/lora-exp"].split(":")[0]
    (cm,) = kt.by_kind(objects, "ConfigMap")
    for key, text in cm["data"].items():  # the rendered ConfigMap's files, byte for byte
        assert (tmp_path / "scratch" / "p" / "configmaps" / "spec" / key).read_text() == text
    assert spec_dir == str(tmp_path / "scratch" / "p" / "configmaps" / "spec")
    assert (tmp_path / "scratch" / "p" / "emptydir" / "tmp").stat().st_mode & 0o1777 == 0o1777


def test_indexed_job_env_comes_from_the_completion_index_and_expands_in_args(tmp_path):
    profile = {**kt.chart_values()["profiles"]["cpu"], "nodes": 2}
    objects, job = _job({"profile": "cpu-n2", "profiles": {"cpu-n2": profile}})
    pod = podrun.pod_template(job)
    main = pod["containers"][0]
    assert any("$(NODE_RANK)" in a for a in main["args"]) or any(
        "job-completion-index" in json.dumps(e) for e in main["env"])
    args = podrun.run_args(pod, main, _cluster(objects, tmp_path), pod_name="p1",
                           annotations={"batch.kubernetes.io/job-completion-index": "1"})
    env = podrun.read_env_file(args)
    assert env["NODE_RANK"] == "1"
    with pytest.raises(podrun.PodSpecError, match="fieldRef"):
        podrun.run_args(pod, main, _cluster(objects, tmp_path), pod_name="p")


def test_secrets_are_required_and_unknown_volumes_refused(tmp_path):
    objects, job = _job({"mlflow": {"tracking": {"existingSecret": "creds"}}})
    pod = podrun.pod_template(job)
    main = pod["containers"][0]
    with pytest.raises(podrun.PodSpecError, match="Secret 'creds'"):
        podrun.run_args(pod, main, _cluster(objects, tmp_path), pod_name="p")
    creds = {"creds": {"username": "u", "password": "pw"}}
    args = podrun.run_args(pod, main, _cluster(objects, tmp_path, secrets=creds), pod_name="p")
    env = podrun.read_env_file(args)
    assert env["MLFLOW_TRACKING_PASSWORD"] == "pw"
    assert "pw" not in " ".join(args)
    broken = copy.deepcopy(pod)
    broken["containers"][0]["volumeMounts"].append({"name": "nope", "mountPath": "/x"})
    with pytest.raises(podrun.PodSpecError, match="nope"):
        podrun.run_args(broken, broken["containers"][0],
                        _cluster(objects, tmp_path, secrets={"creds": {"username": "u", "password": "pw"}}),
                        pod_name="p")


def test_kubernetes_variable_expansion():
    env = {"A": "1", "B": "two"}
    assert podrun.expand("--rank=$(A) $(B) $(C) $$(A)", env) == "--rank=1 two $(C) $(A)"
    assert podrun.expand("cost $$5, $A, $(A)$(B)", env) == "cost $5, $A, 1two"


def test_docker_gets_no_podman_only_flags_and_the_default_grace_period(tmp_path):
    objects, job = _job()
    pod = copy.deepcopy(podrun.pod_template(job))
    pod.pop("terminationGracePeriodSeconds")
    args = podrun.run_args(pod, pod["containers"][0], _cluster(objects, tmp_path, engine="docker"), pod_name="p")
    assert "--read-only" in args and "--read-only-tmpfs=false" not in args and "--image-volume" not in args
    assert _opt(args, "--stop-timeout") == ["30"]


def test_quantities():
    assert podrun.quantity_bytes("2Gi") == 2 * 1024**3
    assert podrun.quantity_bytes("512Mi") == 512 * 1024**2
    assert podrun.quantity_bytes("1G") == 10**9
    assert podrun.quantity_bytes(1000) == 1000
