"""templates/mlflow/*: the tracking server (Deployment, Service, artifact PVC, auth config) and its
bundled PostgreSQL; the Jobs get the server's URI."""

from __future__ import annotations

import configparser

import pytest

from k8s_helpers import container, env_of, jobs, kt, synthetic

ON = {"enabled": True, "postgresql": {"existingSecret": "mlflow-db"}}


def mlflow_objs(render, **mlflow):
    return render(synthetic(mlflow=kt.deep_merge(ON, mlflow)), release="exp")


def one(objs, kind, suffix=""):
    found = [o for o in kt.by_kind(objs, kind) if o["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, [o["metadata"]["name"] for o in found]
    return found[0]


def test_disabled_by_default(render):
    objs = render(synthetic())
    assert not kt.by_kind(objs, "Deployment") and not kt.by_kind(objs, "StatefulSet")
    assert not kt.by_kind(objs, "Service")


def test_server_deployment(render):
    objs = mlflow_objs(render)
    dep = one(objs, "Deployment", "-mlflow")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["/usr/bin/tini", "--", "mlflow"]
    args = c["args"]
    assert args[0] == "server" and "--serve-artifacts" in args
    assert "--artifacts-destination=/mlartifacts" in args
    assert "--host=0.0.0.0" in args and "--port=5000" in args
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    env = env_of(c)
    # PostgreSQL backend; the password only through PGPASSWORD from the Secret.
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "postgresql+psycopg2://mlflow@exp-lora-exp-postgresql:5432/mlflow"
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "password"}
    # MLflow >= 3.5 rejects unknown Host headers: the Service names and localhost (port-forward) are allowed.
    hosts = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    for h in ("exp-lora-exp-mlflow:5000", "exp-lora-exp-mlflow.lora-exp.svc:5000", "localhost:*"):
        assert h in hosts
    # Artifacts on a PVC that survives uninstall; one pod at a time on it.
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    pvc = one(objs, "PersistentVolumeClaim", "-mlflow-artifacts")
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols["artifacts"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    svc = one(objs, "Service", "-mlflow")
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_jobs_get_the_tracking_uri(render):
    objs = mlflow_objs(render)
    svc = one(objs, "Service", "-mlflow")
    for j in jobs(objs):
        uri = env_of(container(j))["MLFLOW_TRACKING_URI"]["value"]
        assert uri == f"http://{svc['metadata']['name']}.{kt.NAMESPACE}.svc:{svc['spec']['ports'][0]['port']}"
        # ...and that Host is one the server accepts.
        dep = one(objs, "Deployment", "-mlflow")
        hosts = env_of(dep["spec"]["template"]["spec"]["containers"][0])["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"]
        assert uri.split("//")[1] in hosts.split(",")


def test_bundled_postgresql(render):
    objs = mlflow_objs(render)
    sts = one(objs, "StatefulSet", "-postgresql")
    svc = one(objs, "Service", "-postgresql")
    assert sts["spec"]["serviceName"] == svc["metadata"]["name"]
    assert svc["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    env = env_of(c)
    assert env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "password"}
    assert c["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "20Gi"
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    assert {"/var/lib/postgresql/data", "/var/run/postgresql", "/tmp"} <= mounts


def test_external_database_and_s3_artifacts(render):
    objs = mlflow_objs(render, backendStore={"existingSecret": "mlflow-db-uri"},
                       artifacts={"destination": "s3://bucket/mlflow",
                                  "s3": {"endpointUrl": "http://minio:9000", "existingSecret": "minio"}})
    assert not kt.by_kind(objs, "StatefulSet") and not kt.by_kind(objs, "PersistentVolumeClaim")
    c = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = env_of(c)
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db-uri", "key": "uri"}
    assert "PGPASSWORD" not in env
    assert "--artifacts-destination=s3://bucket/mlflow" in c["args"]
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio:9000"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "minio"
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "minio"
    assert one(objs, "Deployment")["spec"].get("strategy") is None


def test_basic_auth(render):
    objs = mlflow_objs(render, auth={"enabled": True, "existingSecret": "mlflow-admin"})
    c = one(objs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "--app-name=basic-auth" in c["args"]
    env = env_of(c)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-admin", "key": "password"}
    cm = one(objs, "ConfigMap", "-mlflow-auth")
    ini = configparser.ConfigParser()
    ini.read_string(cm["data"]["basic_auth.ini"])
    assert "admin_password" not in ini["mlflow"]
    assert ini["mlflow"]["database_uri"].startswith("postgresql+psycopg2://mlflow@")
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow-auth/basic_auth.ini"
    # The Jobs log in with the same (referenced) account.
    for j in jobs(objs):
        jenv = env_of(container(j))
        assert jenv["MLFLOW_TRACKING_USERNAME"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin"
        assert jenv["MLFLOW_TRACKING_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-admin"


@pytest.mark.parametrize(
    ("mlflow", "message"),
    [
        ({"postgresql": {"existingSecret": ""}}, "needs mlflow.postgresql.existingSecret"),
        ({"auth": {"enabled": True}}, "needs mlflow.auth.existingSecret"),
        ({"auth": {"enabled": True, "existingSecret": "a"}, "backendStore": {"existingSecret": "u"}},
         "needs mlflow.auth.databaseUri"),
    ],
)
def test_missing_secrets_fail_the_render(mlflow, message):
    import helm_python

    with pytest.raises(helm_python.HelmError, match=message):
        kt.render(synthetic(mlflow=kt.deep_merge(ON, mlflow)))
