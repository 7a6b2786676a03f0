"""templates/job.yaml: one Job per run; profile resources; failure policy; security; the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from k8s_helpers import (
    PROFILES,
    VALUES_FILES,
    cli_argv,
    container,
    env_of,
    jobs,
    kt,
    synthetic,
    torchrun_opts,
    values_id,
)
from lora_exp.cli import build_parser
from lora_exp.config.loading import resolve_runs

SPEC_MOUNT = "/etc/lora-exp"


# ------------------------------------------------------------------------------------------------


def test_one_job_per_run_named_per_revision(render):
    objs1 = render(synthetic(), release="exp", revision=1)
    objs7 = render(synthetic(), release="exp", revision=7)
    names1 = sorted(j["metadata"]["name"] for j in jobs(objs1))
    names7 = sorted(j["metadata"]["name"] for j in jobs(objs7))
    assert names1 == ["exp-lora-exp-baseline-r1", "exp-lora-exp-lora-r8-r1"]
    assert names7 == ["exp-lora-exp-baseline-r7", "exp-lora-exp-lora-r8-r7"]
    # The spec ConfigMap is per revision too, and each Job mounts its own revision's.
    for objs, rev in ((objs1, 1), (objs7, 7)):
        (cm,) = kt.by_kind(objs, "ConfigMap")
        assert cm["metadata"]["name"].endswith(f"-spec-r{rev}") and cm["immutable"] is True
        for j in jobs(objs):
            vols = {v["name"]: v for v in j["spec"]["template"]["spec"]["volumes"]}
            assert vols["spec"]["configMap"]["name"] == cm["metadata"]["name"]


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
def test_every_run_of_a_values_file_gets_a_job(path: Path, render):
    values = kt.values_file(path)
    objs = render(values, release=path.stem)
    names = {j["metadata"]["annotations"]["lora-exp.io/run-name"] for j in jobs(objs)}
    assert names == {r.name for r in resolve_runs(path)}  # a repeated run: one Job per seed
    assert len({j["metadata"]["name"] for j in jobs(objs)}) == len(names)
    for j in jobs(objs):
        assert len(j["metadata"]["name"]) <= 58  # pod hostnames <job>-<index> stay DNS labels


def test_run_selection_and_per_run_profile(render):
    objs = render(synthetic(profile="a100-80g", job={"runs": ["baseline"], "runProfiles": {"baseline": "t4-16g"}}))
    (j,) = jobs(objs)
    assert j["metadata"]["labels"]["lora-exp.io/profile"] == "t4-16g"
    assert j["metadata"]["labels"]["app.kubernetes.io/component"] == "eval"
    assert container(j)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_colliding_job_names_fail(render):
    import helm_python

    values = synthetic(experiment={"runs": {"a_b": {}, "a.b": {}}})
    with pytest.raises(helm_python.HelmError, match="both map to the Job name"):
        kt.render(values)


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_resources_and_placement(profile: str, render, chart_values):
    p = chart_values["profiles"][profile]
    objs = render(synthetic(profile=profile, job={"nodeSelector": {"pool": "ml"}, "tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}]}))
    for j in jobs(objs):
        pod = j["spec"]["template"]["spec"]
        c = container(j)
        res = c["resources"]
        if p["gpus"]:
            assert res["limits"]["nvidia.com/gpu"] == p["gpus"] == res["requests"]["nvidia.com/gpu"]
            assert pod["nodeSelector"]["nvidia.com/gpu.product"] == p["nodeSelector"]["nvidia.com/gpu.product"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            assert c["image"].endswith("-cuda")
        else:
            assert "nvidia.com/gpu" not in res["limits"] and "nvidia.com/gpu" not in res["requests"]
            assert c["image"].endswith("-cpu")
        assert res["requests"]["cpu"] == p["resources"]["requests"]["cpu"]
        assert res["requests"]["memory"] == p["resources"]["requests"]["memory"]
        assert res["limits"]["memory"] == p["resources"]["limits"]["memory"]
        # The chart-wide placement is added to the profile's, not replacing it.
        assert pod["nodeSelector"]["pool"] == "ml"
        assert any(t.get("key") == "dedicated" for t in pod["tolerations"])
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": p["shmSize"]}
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert c["env"][0] == {"name": "LORA_EXP_PROFILE", "value": profile}


def test_failure_policy(render):
    for j in jobs(render(synthetic(job={"backoffLimit": 5, "activeDeadlineSeconds": 600,
                                        "ttlSecondsAfterFinished": 60}))):
        spec = j["spec"]
        assert spec["backoffLimit"] == 5
        assert spec["activeDeadlineSeconds"] == 600
        assert spec["ttlSecondsAfterFinished"] == 60
        assert spec["podReplacementPolicy"] == "Failed"
        assert spec["template"]["spec"]["restartPolicy"] == "Never"
        rules = spec["podFailurePolicy"]["rules"]
        fail = [r for r in rules if r["action"] == "FailJob"]
        assert fail == [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [2, 3]}}]
        # No containerName: the exit code of the validate init container counts as well.
        ignore = [r for r in rules if r["action"] == "Ignore"]
        assert ignore == [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
        # Time for the SIGTERM handler to save a checkpoint.
        assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= 60


def test_optional_deadlines_can_be_turned_off(render):
    for j in jobs(render(synthetic(job={"activeDeadlineSeconds": 0, "ttlSecondsAfterFinished": 0}))):
        assert "activeDeadlineSeconds" not in j["spec"] and "ttlSecondsAfterFinished" not in j["spec"]


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
@pytest.mark.parametrize("profile", ["cpu", "a100-80g", "h100-80g-x8", "h100-80g-x8-n2"])
def test_container_command_parses_with_the_real_cli(path: Path, profile: str, render):
    values = kt.deep_merge(kt.values_file(path), {"profile": profile})
    objs = render(values, release=path.stem)
    (cm,) = kt.by_kind(objs, "ConfigMap")
    runs = values["experiment"]["runs"]
    parser = build_parser()
    for j in jobs(objs):
        run = j["metadata"]["annotations"]["lora-exp.io/run-name"]
        key_of_run = run.split("/seed-")[0]  # a repeat runs its run's fields with its own seed
        main = container(j)
        args = parser.parse_args(cli_argv(main))
        assert args.command == j["metadata"]["labels"]["app.kubernetes.io/component"]
        expected_job = ((runs[key_of_run] or {}).get("job") or values["experiment"].get("defaults", {}).get("job")
                        or "train")
        assert args.command == expected_job
        # The spec file (one per run) is in the ConfigMap and holds exactly this run.
        assert args.values.startswith(f"{SPEC_MOUNT}/")
        key = Path(args.values).name
        assert key in cm["data"]
        assert list(yaml.safe_load(cm["data"][key])["experiment"]["runs"]) == [key_of_run]
        # --run names it too, except under torchrun (see test_torchrun_parses_the_launcher...).
        assert args.run == (None if main["args"][0] == "torchrun" else run)
        assert args.overrides == ["output_root=/outputs"]
        # The validate init container checks exactly what the main container will run.
        init = container(j, "validate")
        vargs = parser.parse_args(cli_argv(init))
        # ... and its memory plan against the run's own profile (lora-exp plan --check: exit 2 if it cannot fit).
        assert vargs.command == "plan" and vargs.check
        assert (vargs.values, vargs.run, vargs.overrides) == (args.values, run, args.overrides)
        assert vargs.profile == j["metadata"]["labels"]["lora-exp.io/profile"]
        assert vargs.profiles == f"{SPEC_MOUNT}/profiles.yaml"
        assert vargs.profile in json.loads(cm["data"]["profiles.yaml"])["profiles"]
        # The spec is mounted where the command reads it.
        mounts = {m["name"]: m for m in main["volumeMounts"]}
        assert mounts["spec"]["mountPath"] == SPEC_MOUNT and mounts["spec"]["readOnly"] is True
        assert mounts["outputs"]["mountPath"] == "/outputs"


@pytest.mark.parametrize("profile", PROFILES)
def test_launcher_matches_the_profile(profile: str, render, chart_values):
    p = chart_values["profiles"][profile]
    for j in jobs(render(synthetic(profile=profile))):
        c = container(j)
        opts = torchrun_opts(c)
        if p["gpus"] <= 1 and p["nodes"] == 1:
            assert c["args"][0] == "lora-exp"
        elif p["nodes"] == 1:
            assert "--standalone" in opts and opts["--nproc-per-node"] == str(p["gpus"]) and opts["--nnodes"] == "1"
        else:
            assert opts["--nnodes"] == str(p["nodes"]) and opts["--nproc-per-node"] == str(p["gpus"])
            assert opts["--rdzv-backend"] == "c10d"


def test_restricted_security_context(render):
    objs = render(synthetic(profile="a100-80g"))
    for j in jobs(objs):
        pod = j["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
        sc = pod["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] > 0 and sc["runAsGroup"] > 0
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"] + pod["initContainers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False
            assert csc["readOnlyRootFilesystem"] is True
            assert csc["capabilities"] == {"drop": ["ALL"]}
            assert csc["runAsNonRoot"] is True
            # Every path the job writes is a volume (root fs is read-only).
            paths = {m["mountPath"] for m in c["volumeMounts"]}
            assert {"/tmp", "/outputs", "/hf-cache"} <= paths


def test_env_contract(render):
    objs = render(synthetic(hf={"existingSecret": "hf"}, airGapped=True,
                            mlflow={"trackingUri": "https://mlflow.example.com", "tracking": {"existingSecret": "ml"}}))
    for j in jobs(objs):
        env = env_of(container(j))
        assert env["MLFLOW_TRACKING_URI"]["value"] == "https://mlflow.example.com"
        assert env["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"] == {"name": "ml", "key": "username"}
        assert env["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "ml", "key": "password"}
        assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
        assert env["HF_HOME"]["value"] == "/hf-cache"
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
        assert env["LORA_EXP_IMAGE"]["value"] == container(j)["image"]
        assert env["LORA_EXP_PROFILE"]["value"] == "cpu"
    # Defaults: no secrets referenced, online, tracking into the outputs volume (MLflow 3 refuses new
    # file:// stores, hence sqlite).
    for j in jobs(render(synthetic(), release="rel")):
        env = env_of(container(j))
        assert env["MLFLOW_TRACKING_URI"]["value"] == "sqlite:////outputs/mlflow.db"
        assert env["LORA_EXP_RELEASE"]["value"] == "rel"
        assert not {"HF_TOKEN", "HF_HUB_OFFLINE", "MLFLOW_TRACKING_PASSWORD"} & set(env)


def test_image_reference(render):
    image = {"repository": "reg.example/ml/lora-exp", "digest": "sha256:" + "a" * 64}
    objs = render(synthetic(profile="t4-16g", image=image))
    for j in jobs(objs):
        assert container(j)["image"] == f"reg.example/ml/lora-exp:0.1.0-cuda@sha256:{'a' * 64}"
    objs = render(synthetic(image={"tag": "v2"}))
    assert {container(j)["image"] for j in jobs(objs)} == {"lora-exp:v2"}


def test_kueue_priority_and_pull_secrets(render):
    objs = render(synthetic(kueue={"queueName": "team-a", "priorityClass": "wp-high"},
                            priorityClassName="lora-exp-high", imagePullSecrets=[{"name": "regcred"}]))
    for j in jobs(objs):
        labels = j["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "team-a"
        assert labels["kueue.x-k8s.io/priority-class"] == "wp-high"
        pod = j["spec"]["template"]["spec"]
        assert pod["priorityClassName"] == "lora-exp-high"
        assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    for j in jobs(render(synthetic())):
        assert not any(k.startswith("kueue.x-k8s.io/") for k in j["metadata"]["labels"])


def test_volumes(render):
    pod = jobs(render(synthetic()))[0]["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["outputs"]["persistentVolumeClaim"]["claimName"] == "lora-exp-outputs"
    assert vols["hf-cache"]["persistentVolumeClaim"]["claimName"] == "lora-exp-hf-cache"
    assert "data" not in vols
    pod = jobs(render(synthetic(persistence={"outputs": {"existingClaim": ""}, "data": {"existingClaim": "d"}})))[0]
    vols = {v["name"]: v for v in pod["spec"]["template"]["spec"]["volumes"]}
    assert vols["outputs"] == {"name": "outputs", "emptyDir": {}}
    assert vols["data"]["persistentVolumeClaim"] == {"claimName": "d", "readOnly": True}


def test_labels(render):
    for j in jobs(render(synthetic(), release="rel")):
        labels = j["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "lora-exp"
        assert labels["app.kubernetes.io/instance"] == "rel"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert re.fullmatch(r"lora-exp-\d+\.\d+\.\d+", labels["helm.sh/chart"])
        pod_labels = j["spec"]["template"]["metadata"]["labels"]
        assert pod_labels["lora-exp.io/job"] == j["metadata"]["name"]


def test_validate_init_container_can_be_disabled(render):
    for j in jobs(render(synthetic(job={"validateSpec": False}))):
        assert "initContainers" not in j["spec"]["template"]["spec"]


def test_plan_check_can_be_turned_off(render):
    """job.planCheck false: the init container validates only (no memory plan)."""
    parser = build_parser()
    for j in jobs(render(synthetic(job={"planCheck": False}))):
        assert parser.parse_args(cli_argv(container(j, "validate"))).command == "validate"


@pytest.mark.parametrize("profile", [p for p in PROFILES if p.endswith(("-x2", "-x4", "-x8", "-n2", "-n4"))])
@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_torchrun_parses_the_launcher_and_passes_the_cli_through(profile: str, backend: str, render):
    """torchrun's own parser (abbreviations allowed) must neither choke on nor swallow lora-exp's options:
    e.g. `--run` would be taken as an abbreviation of torchrun's --run-path, hence per-run spec files."""
    run_mod = pytest.importorskip("torch.distributed.run")
    parser = run_mod.get_args_parser()
    for j in jobs(render(synthetic(profile=profile, torchrun={"rdzvBackend": backend}))):
        c = container(j)
        assert c["args"][0] == "torchrun"
        # Kubernetes expands $(NODE_RANK) from the pod's env before exec.
        args = parser.parse_args([a.replace("$(NODE_RANK)", "1") for a in c["args"][1:]])
        assert args.module is True and args.training_script == "lora_exp"
        assert args.training_script_args == cli_argv(c)
        assert "--run" not in args.training_script_args
        # The spec file the command reads holds exactly this run, so no --run is needed.
        assert build_parser().parse_args(args.training_script_args).run is None


def _readme_exit_codes() -> dict[int, str]:
    """code -> its 'on Kubernetes' cell, from the README's exit-code table."""
    text = (kt.REPO / "README.md").read_text()
    table = text.split("**Exit codes**", 1)[1].split("\n\n", 2)[1]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:] if line.startswith("|")]
    return {int(cells[0].strip()): cells[2].strip() for cells in rows}


def test_readme_exit_code_table_agrees_with_the_code_and_the_failure_policy(render):
    """One contract, three places: lora_exp.core.errors, the README's table, the chart's podFailurePolicy."""
    from lora_exp.core import errors

    documented = _readme_exit_codes()
    defined = {v for k, v in vars(errors).items() if k.isupper() and isinstance(v, int)}
    assert set(documented) == defined, (documented, defined)
    fail_job = {code for code, cell in documented.items() if cell.startswith("FailJob")}
    retried = {code for code, cell in documented.items() if cell.startswith("retried")}
    assert fail_job == {errors.USER_ERROR, errors.SANITY_FAILED}
    assert {errors.INTERNAL, errors.TRACKER_UNAVAILABLE, errors.PREEMPTED} <= retried
    for j in jobs(render(synthetic())):
        rules = j["spec"]["podFailurePolicy"]["rules"]
        failing = {c for r in rules if r["action"] == "FailJob" for c in r["onExitCodes"]["values"]}
        assert failing == fail_job
        assert not failing & retried


def _spec_runs(objs, job) -> list:
    """The runs lora-exp resolves from the ConfigMap file a Job reads, with the args the Job passes."""
    import tempfile

    from lora_exp.config.loading import resolve_runs

    (cm,) = kt.by_kind(objs, "ConfigMap")[:1]
    args = job["spec"]["template"]["spec"]["containers"][0]["args"]
    key = args[args.index("-f") + 1].rsplit("/", 1)[1]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / key
        path.write_text(cm["data"][key])
        run = args[args.index("--run") + 1] if "--run" in args else None
        return resolve_runs(path, run)


def test_repeats_render_one_job_per_seed_whose_spec_resolves_to_that_repeat(render):
    objs = render(synthetic(experiment={"runs": {"lora_r8": {"repeats": 3, "training": {"seed": 7}},
                                                 "twin": {"seeds": [11, 13]}}}))
    by_run = {j["metadata"]["annotations"]["lora-exp.io/run-name"]: j for j in jobs(objs)}
    assert set(by_run) == {"baseline", "lora_r8/seed-7", "lora_r8/seed-8", "lora_r8/seed-9", "twin/seed-11",
                           "twin/seed-13"}
    for name, job in by_run.items():
        (run,) = _spec_runs(objs, job)  # the Job runs exactly its repeat, under its name
        assert run.name == name
        if "/seed-" in name:
            assert run.spec.training.seed == run.spec.data.seed == int(name.rsplit("-", 1)[1])
        assert not kt.k8s_errors(job, kt.KUBE_VERSIONS[-1])


def test_a_sweep_renders_an_indexed_job_of_workers_sharing_the_study(render):
    sweep = {"metric": "validation_accuracy", "trials": 6, "workers": 3,
             "params": {"training.learning_rate": {"low": 1e-5, "high": 1e-3, "log": True}}}
    objs = render(synthetic(experiment={"runs": {"lora_r8": {"sweep": sweep}}}))
    job = next(j for j in jobs(objs) if j["metadata"]["annotations"]["lora-exp.io/run-name"] == "lora_r8")
    spec = job["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    pod = spec["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert args[:2] == ["lora-exp", "sweep"] and args[-2:] == ["--worker", "$(SWEEP_WORKER)"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["SWEEP_WORKER"]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    parsed = build_parser().parse_args([a.replace("$(SWEEP_WORKER)", "2") for a in args[1:]])
    assert parsed.command == "sweep" and parsed.worker == 2 and parsed.run == "lora_r8"
    validate = pod["initContainers"][0]["args"]
    assert validate[:3] == ["lora-exp", "plan", "--check"] and "sweep" not in validate  # validate + the memory plan
    (run,) = _spec_runs(objs, job)
    assert run.spec.sweep is not None and run.spec.sweep.workers == 3
    assert not kt.k8s_errors(job, kt.KUBE_VERSIONS[0]) and not kt.k8s_errors(job, kt.KUBE_VERSIONS[-1])


def test_a_sweep_on_a_multi_gpu_profile_fails_to_render(render):
    import helm_python

    sweep = {"metric": "validation_accuracy", "params": {"method.r": {"choices": [2, 4]}}}
    with pytest.raises(helm_python.HelmError, match="is a sweep"):
        render(synthetic(profile="a100-80g-x4", experiment={"runs": {"lora_r8": {"sweep": sweep}}}))
