"""Every shipped values file, and every hardware profile, renders with the real Helm engine into objects
that pass Kubernetes' strict schemas; `helm lint --strict` passes."""

from __future__ import annotations

from pathlib import Path

import pytest

from k8s_helpers import PROFILES, VALUES_FILES, jobs, kt, synthetic, values_id


def assert_valid(objs):
    errors = [e for o in objs for v in kt.KUBE_VERSIONS for e in kt.k8s_errors(o, v)]
    assert not errors, "\n".join(errors)


def test_values_files_exist():
    assert VALUES_FILES, "no values/*.yaml found"
    assert (kt.VALUES_DIR / "smoke.yaml") in VALUES_FILES


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
def test_values_file_renders_valid_objects(path: Path, render):
    objs = render(kt.values_file(path), release=path.stem)
    kinds = {o["kind"] for o in objs}
    assert {"ConfigMap", "Job", "ServiceAccount"} <= kinds
    assert_valid(objs)


@pytest.mark.parametrize("path", VALUES_FILES, ids=values_id)
@pytest.mark.parametrize("profile", PROFILES)
def test_values_file_on_every_profile(path: Path, profile: str, render):
    """The cross product: any shipped experiment can run on any profile."""
    values = kt.deep_merge(kt.values_file(path), {"profile": profile})
    objs = render(values, release=path.stem)
    assert_valid(objs)
    per_run = values.get("job", {}).get("runProfiles", {})
    for j in jobs(objs):
        run = j["metadata"]["annotations"]["lora-exp.io/run-name"]
        assert j["metadata"]["labels"]["lora-exp.io/profile"] == per_run.get(run, profile)


@pytest.mark.parametrize("profile", PROFILES)
def test_profile_renders_valid_objects_with_everything_on(profile: str, render):
    """Every optional feature at once: Kueue, priority, pull secrets, secrets, air-gapped, MLflow + auth."""
    values = synthetic(
        profile=profile,
        kueue={"queueName": "lora-exp", "priorityClass": "high"},
        priorityClassName="lora-exp-high",
        imagePullSecrets=[{"name": "regcred"}],
        airGapped=True,
        hf={"existingSecret": "hf-token"},
        persistence={"data": {"existingClaim": "lora-exp-data"}},
        job={"extraEnv": [{"name": "NCCL_DEBUG", "value": "WARN"}], "podLabels": {"team": "nlp"}},
        mlflow={"enabled": True, "postgresql": {"existingSecret": "db"},
                "auth": {"enabled": True, "existingSecret": "mlflow-admin"}},
    )
    assert_valid(render(values))


def test_helm_lint_strict():
    import helm_python

    for path in VALUES_FILES:
        for kube in ("v1.31.0", "v1.37.0"):
            report = helm_python.lint(kt.CHART, kt.values_file(path), strict=True, kube_version=kube)
            bad = [m for m in report["messages"] if m["severity"] >= 2]
            assert not report["errors"] and not bad, f"{path.name} @ {kube}: {report}"


def test_lint_reports_a_broken_spec():
    """Lint is not a rubber stamp: a spec violating the schema is an error."""
    import helm_python

    values = synthetic(experiment={"runs": {"lora_r8": {"training": {"precision": "fp8"}}}})
    report = helm_python.lint(kt.CHART, values, strict=True)
    assert report["errors"]


def test_render_fails_readably_without_experiment():
    import helm_python

    with pytest.raises(helm_python.HelmError, match="no experiment"):
        kt.render({})
