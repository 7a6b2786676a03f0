"""templates/service-headless.yaml + the Indexed Job of multi-node profiles: names and rank wiring agree."""

from __future__ import annotations

import pytest

from k8s_helpers import MULTI_NODE, PROFILES, container, env_of, jobs, kt, synthetic, torchrun_opts


def test_there_are_multi_node_profiles():
    assert MULTI_NODE, "the chart must ship multi-node profiles"


@pytest.mark.parametrize("profile", MULTI_NODE)
@pytest.mark.parametrize("backend", ["c10d", "static"])
def test_multi_node_wiring(profile: str, backend: str, render, chart_values):
    p = chart_values["profiles"][profile]
    objs = render(synthetic(profile=profile, torchrun={"rdzvBackend": backend}), release="mn")
    services = {s["metadata"]["name"]: s for s in kt.by_kind(objs, "Service")}
    assert len(jobs(objs)) == 2
    for j in jobs(objs):
        name = j["metadata"]["name"]
        spec = j["spec"]
        pod = spec["template"]["spec"]
        # An Indexed Job, all nodes at once.
        assert spec["completionMode"] == "Indexed"
        assert spec["completions"] == spec["parallelism"] == p["nodes"]
        assert spec["podReplacementPolicy"] == "Failed"
        # Its headless Service: same name, the pods' subdomain, selects exactly this Job's pods.
        svc = services[pod["subdomain"]]
        assert svc["metadata"]["name"] == name
        assert svc["spec"]["clusterIP"] == "None"
        assert svc["spec"]["publishNotReadyAddresses"] is True
        pod_labels = spec["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()
        assert svc["spec"]["selector"]["lora-exp.io/job"] == name
        # Rendezvous on pod 0 = hostname "<job>-0" in that subdomain.
        c = container(j)
        opts = torchrun_opts(c)
        pod0 = f"{name}-0.{name}.{kt.NAMESPACE}.svc.cluster.local"
        port = str(chart_values["torchrun"]["port"])
        assert opts["--nnodes"] == str(p["nodes"])
        assert opts["--nproc-per-node"] == str(p["gpus"])
        if backend == "c10d":
            assert opts["--rdzv-backend"] == "c10d"
            assert opts["--rdzv-endpoint"] == f"{pod0}:{port}"
            assert opts["--rdzv-id"] == name
        else:
            assert opts["--rdzv-backend"] == "static"
            assert opts["--master-addr"] == pod0 and opts["--master-port"] == port
            assert opts["--node-rank"] == "$(NODE_RANK)"
        # Node rank = the Job completion index (Kubernetes expands $(NODE_RANK) from this env var).
        env = env_of(c)
        assert env["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] == (
            "metadata.annotations['batch.kubernetes.io/job-completion-index']")
        assert {"name": "rdzv", "containerPort": int(port)} in c["ports"]
        assert svc["spec"]["ports"][0]["port"] == int(port) and svc["spec"]["ports"][0]["targetPort"] == "rdzv"


@pytest.mark.parametrize("profile", [p for p in PROFILES if p not in MULTI_NODE])
def test_single_node_has_no_service_or_index(profile: str, render):
    objs = render(synthetic(profile=profile))
    assert not kt.by_kind(objs, "Service")
    for j in jobs(objs):
        assert "completionMode" not in j["spec"] and "subdomain" not in j["spec"]["template"]["spec"]
        assert "NODE_RANK" not in env_of(container(j))
