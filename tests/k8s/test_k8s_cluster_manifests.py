"""k8s/: what a user applies once per cluster. Valid objects, and in sync with the chart (PVC names,
namespace, Kueue flavors generated from the profiles)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from k8s_helpers import jobs, kt, pod_specs, synthetic

MANIFESTS = sorted((kt.REPO / "k8s").glob("*.yaml"))


def docs(path: Path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def test_manifests_exist():
    names = {p.name for p in MANIFESTS}
    assert {"namespace.yaml", "storage.yaml", "priorityclasses.yaml", "kueue.yaml"} <= names


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_core_objects_are_valid(path: Path):
    for obj in docs(path):
        if obj["apiVersion"].startswith("kueue.x-k8s.io/"):
            continue  # CRDs: checked structurally below
        errors = [e for v in kt.KUBE_VERSIONS for e in kt.k8s_errors(obj, v)]
        assert not errors, errors
        if obj["kind"] not in ("Namespace", "PriorityClass"):
            assert obj["metadata"]["namespace"] == kt.NAMESPACE


def test_pvcs_are_the_chart_defaults(chart_values):
    pvcs = {o["metadata"]["name"]: o for o in docs(kt.REPO / "k8s" / "storage.yaml")}
    p = chart_values["persistence"]
    assert set(pvcs) == {p["outputs"]["existingClaim"], p["hfCache"]["existingClaim"]}
    for name, mount in ((p["outputs"]["existingClaim"], p["outputs"]["mountPath"]),
                        (p["hfCache"]["existingClaim"], p["hfCache"]["mountPath"])):
        assert pvcs[name]["metadata"]["annotations"]["lora-exp.io/mount-path"] == mount
        # Several Jobs and every node of a multi-node run mount them at once.
        assert pvcs[name]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_namespace_enforces_restricted():
    (ns,) = docs(kt.REPO / "k8s" / "namespace.yaml")
    assert ns["metadata"]["name"] == kt.NAMESPACE
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_priority_classes_fit_the_chart(render):
    names = {o["metadata"]["name"] for o in docs(kt.REPO / "k8s" / "priorityclasses.yaml")}
    assert "lora-exp-high" in names
    for j in jobs(render(synthetic(priorityClassName="lora-exp-high"))):
        assert j["spec"]["template"]["spec"]["priorityClassName"] in names


def test_kueue_yaml_is_generated_from_the_profiles():
    assert kt.KUEUE.read_text() == kt.kueue_text(), "k8s/kueue.yaml is stale: make -f mk/k8s.mk k8s-kueue"


def test_kueue_objects_are_consistent(chart_values, render):
    objs = docs(kt.KUEUE)
    flavors = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ResourceFlavor"}
    (cq,) = [o for o in objs if o["kind"] == "ClusterQueue"]
    (lq,) = [o for o in objs if o["kind"] == "LocalQueue"]
    assert all(o["apiVersion"] == "kueue.x-k8s.io/v1beta2" for o in objs)
    assert lq["spec"]["clusterQueue"] == cq["metadata"]["name"] and lq["metadata"]["namespace"] == kt.NAMESPACE
    (group,) = cq["spec"]["resourceGroups"]
    assert group["coveredResources"] == ["cpu", "memory", "nvidia.com/gpu"]
    assert [f["name"] for f in group["flavors"]] == list(flavors)
    for f in group["flavors"]:
        assert [r["name"] for r in f["resources"]] == group["coveredResources"]
    # Every profile lands on a flavor whose node labels it requests, and the largest one fits the quota.
    quota = {f["name"]: {r["name"]: r["nominalQuota"] for r in f["resources"]} for f in group["flavors"]}
    for name, p in chart_values["profiles"].items():
        matching = [f for f, o in flavors.items()
                    if name in o["metadata"]["annotations"]["lora-exp.io/profiles"].split(",")]
        assert len(matching) == 1, name
        flavor = flavors[matching[0]]
        assert flavor["spec"].get("nodeLabels", {}) == (p.get("nodeSelector") or {})
        assert quota[matching[0]]["nvidia.com/gpu"] >= p["gpus"] * p["nodes"]
    # The chart's queue label points at the LocalQueue.
    for j in jobs(render(synthetic(kueue={"queueName": lq["metadata"]["name"]}))):
        assert j["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == lq["metadata"]["name"]


def test_hf_cache_loader_is_restricted(chart_values):
    objs = docs(kt.REPO / "k8s" / "hf-cache-loader.yaml")
    (pod,) = [o for o in objs if o["kind"] == "Pod"]
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert "ingress" not in policy["spec"]  # no ingress at all
    ((_, spec),) = pod_specs([pod])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    (c,) = spec["containers"]
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    claim = next(v for v in spec["volumes"] if v["name"] == "hf-cache")["persistentVolumeClaim"]["claimName"]
    assert claim == chart_values["persistence"]["hfCache"]["existingClaim"]
