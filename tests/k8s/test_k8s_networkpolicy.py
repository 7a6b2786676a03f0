"""templates/networkpolicy.yaml: every pod of the chart is selected by an ingress allow-list."""

from __future__ import annotations

from k8s_helpers import jobs, kt, synthetic

ON = {"enabled": True, "postgresql": {"existingSecret": "db"}}


def selects(policy, labels) -> bool:
    return policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_every_pod_is_covered(render):
    objs = render(synthetic(profile="a10g-24g-x4-n2", mlflow=ON))
    policies = kt.by_kind(objs, "NetworkPolicy")
    for o in objs:
        if o["kind"] in ("Job", "Deployment", "StatefulSet"):
            labels = o["spec"]["template"]["metadata"]["labels"]
            assert [p for p in policies if selects(p, labels)], o["metadata"]["name"]


def test_job_ingress_only_from_its_own_pods(render):
    objs = render(synthetic(profile="a10g-24g-x4-n2"))
    policies = {p["metadata"]["name"]: p for p in kt.by_kind(objs, "NetworkPolicy")}
    for j in jobs(objs):
        p = policies[j["metadata"]["name"]]
        labels = j["spec"]["template"]["metadata"]["labels"]
        assert p["spec"]["policyTypes"] == ["Ingress"]  # egress open: hub, S3, MLflow
        (rule,) = p["spec"]["ingress"]
        (peer,) = rule["from"]
        assert peer["podSelector"]["matchLabels"].items() <= labels.items()
        assert peer["podSelector"]["matchLabels"]["lora-exp.io/job"] == j["metadata"]["name"]


def test_postgresql_only_from_mlflow(render):
    objs = render(synthetic(mlflow=ON))
    pg = next(p for p in kt.by_kind(objs, "NetworkPolicy") if p["metadata"]["name"].endswith("-postgresql"))
    dep = kt.by_kind(objs, "Deployment")[0]
    (rule,) = pg["spec"]["ingress"]
    mlflow_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert rule["from"][0]["podSelector"]["matchLabels"].items() <= mlflow_labels.items()
    assert rule["ports"] == [{"port": "postgresql", "protocol": "TCP"}]


def test_can_be_disabled(render):
    assert not kt.by_kind(render(synthetic(mlflow=ON, networkPolicy={"enabled": False})), "NetworkPolicy")
