"""templates/serviceaccount.yaml: the pods' identity, with no API token mounted anywhere."""

from __future__ import annotations

from k8s_helpers import VALUES_FILES, kt, pod_specs, synthetic


def renders(render):
    yield "mlflow", render(synthetic(mlflow={"enabled": True, "postgresql": {"existingSecret": "db"}}))
    for path in VALUES_FILES:
        yield path.name, render(kt.values_file(path), release=path.stem)


def test_service_account_never_mounts_a_token(render):
    for label, objs in renders(render):
        (sa,) = kt.by_kind(objs, "ServiceAccount")
        assert sa["automountServiceAccountToken"] is False, label
        for owner, pod in pod_specs(objs):
            assert pod["serviceAccountName"] == sa["metadata"]["name"], owner


def test_external_service_account(render):
    objs = render(synthetic(serviceAccount={"create": False, "name": "ml-runner"}))
    assert not kt.by_kind(objs, "ServiceAccount")
    assert {pod["serviceAccountName"] for _, pod in pod_specs(objs)} == {"ml-runner"}
