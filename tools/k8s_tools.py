"""Helpers for the Kubernetes packaging: render the chart with the real Helm engine, validate objects
strictly, and (re)generate the files derived from other sources. Used by tests/k8s and by mk/k8s.mk:

    python tools/k8s_tools.py schema    # charts/values.schema.json (tools/chart_schema.py)
    python tools/k8s_tools.py golden    # tests/k8s/golden/<values file>.yaml <- helm render
    python tools/k8s_tools.py kueue     # k8s/kueue.yaml <- the chart's hardware profiles
    python tools/k8s_tools.py render values/smoke.yaml [--set-json '{"profile": "t4-16g"}']
    python tools/k8s_tools.py scan-manifests .cache/k8s-scan   # input of the checkov scan

Rendering uses helm-python-sdk (Helm v4's Go SDK in a wheel): the same template engine, values
coalescing and values.schema.json validation as `helm template`, with no helm binary.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from chart_schema import EXPERIMENT_SCHEMA_ID, SCHEMA, generated_schema, schema_text
from lora_exp.config.loading import deep_merge as spec_deep_merge

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts"
VALUES_DIR = REPO / "values"
GOLDEN_DIR = REPO / "tests" / "k8s" / "golden"
KUEUE = REPO / "k8s" / "kueue.yaml"
NAMESPACE = "lora-exp"
# Strict schemas of this Kubernetes version (kubernetes-validate ships 1.25 to 1.37). The chart's
# kubeVersion floor is 1.31; both ends are checked.
KUBE_VERSIONS = ("1.31", "1.37")
__all__ = ["EXPERIMENT_SCHEMA_ID", "SCHEMA", "generated_schema", "schema_text"]  # re-exported for the tests


# ------------------------------------------------------------------------------------------------
# Rendering


@functools.lru_cache(maxsize=1)
def chart():
    import helm_python

    return helm_python.Chart.load(CHART)


def values_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a values file exactly as `helm -f` does (YAML 1.1 rules included)."""
    import helm_python

    return helm_python.values_from_yaml(Path(path).read_text())


# Helm merges successive `-f`/`--set` layers the way the spec merges runs: maps merge, the rest replaces.
deep_merge = spec_deep_merge


def render_raw(values: dict[str, Any], *, release: str = "lora-exp", revision: int = 1) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included), as `helm template` would produce."""
    return chart().render(values, name=release, namespace=NAMESPACE, revision=revision, is_install=True)


def render(values: dict[str, Any], *, release: str = "lora-exp", revision: int = 1) -> list[dict[str, Any]]:
    """The rendered Kubernetes objects, in a stable order (template path, then document order)."""
    objs = []
    for path, text in sorted(render_raw(values, release=release, revision=revision).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objs.append(doc)
    return objs


def notes(values: dict[str, Any], *, release: str = "lora-exp") -> str:
    return next(t for p, t in render_raw(values, release=release).items() if p.endswith("NOTES.txt"))


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def shipped_values_files() -> list[Path]:
    return sorted(VALUES_DIR.glob("*.yaml"))


def chart_values() -> dict[str, Any]:
    return chart().values


# ------------------------------------------------------------------------------------------------
# Strict validation (kubernetes-validate's strict schemas, cached: each file is parsed once)


@functools.cache
def _validator(version: str, kind: str, api_version: str):
    import jsonschema
    import referencing
    from kubernetes_validate import utils

    full = [v for v in utils.all_versions() if utils.major_minor(v) == version][-1]
    group = api_version.split("/")[0].split(".")[0] + "-" if "/" in api_version else ""
    ver = api_version.split("/")[-1]
    schema_dir = f"kubernetes-json-schema/v{full}-local-strict"
    schema = utils.schema_contents(f"{schema_dir}/{kind.lower()}-{group}{ver}.json", version)
    defs = _definitions(schema_dir, version)
    # Both files carry their own $id ("/api/..."); registered the way kubernetes_validate.validate does.
    registry = defs @ (referencing.Resource.from_contents(schema) @ referencing.Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


@functools.cache
def _definitions(schema_dir: str, version: str):
    import referencing
    from kubernetes_validate import utils

    return referencing.Resource.from_contents(utils.schema_contents(f"{schema_dir}/_definitions.json", version))


def k8s_errors(obj: dict[str, Any], version: str) -> list[str]:
    """Strict schema errors of one object for a Kubernetes minor version ('' entries never)."""
    v = _validator(version, obj["kind"], obj["apiVersion"])
    name = f"{obj['kind']}/{obj.get('metadata', {}).get('name')}"
    return [f"{name}: {'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(obj)]


# ------------------------------------------------------------------------------------------------
# values.schema.json (generated by chart_schema.py)


def lora_exp_schema() -> dict[str, Any]:
    """`lora-exp schema`, run as users run it."""
    exe = Path(sys.executable).with_name("lora-exp")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lora_exp"]
    out = subprocess.run([*cmd, "schema"], check=True, capture_output=True, text=True, cwd=REPO).stdout
    return dict(json.loads(out))


# ------------------------------------------------------------------------------------------------
# Goldens


def golden_text(values_path: Path) -> str:
    """The chart rendered for one shipped values file, as a multi-document YAML file."""
    release = values_path.stem
    raw = render_raw(values_file(values_path), release=release)
    parts = [
        f"# Golden render of {values_path.relative_to(REPO)} (release {release}, namespace {NAMESPACE}, revision 1).\n"
        "# Regenerate: UPDATE_GOLDEN=1 pytest tests/k8s  (or make -f mk/k8s.mk k8s-golden)\n"
    ]
    for path, text in sorted(raw.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        parts.append(f"---\n# Source: {path}\n{text.strip()}\n")
    return "".join(parts)


def golden_path(values_path: Path) -> Path:
    return GOLDEN_DIR / f"{values_path.stem}.yaml"


# ------------------------------------------------------------------------------------------------
# k8s/kueue.yaml: one ResourceFlavor per GPU model of the chart's profiles


def kueue_objects(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    values = values or chart_values()
    profiles = values["profiles"]
    flavors: dict[str, dict[str, Any]] = {}
    for name in sorted(profiles):
        p = profiles[name]
        selector = p.get("nodeSelector") or {}
        product = selector.get("nvidia.com/gpu.product")
        flavor = "cpu" if not p.get("gpus") else f"gpu-{product.lower()}"
        f = flavors.setdefault(flavor, {"nodeLabels": dict(selector), "tolerations": p.get("tolerations") or [],
                                         "profiles": []})
        f["profiles"].append(name)
    objs: list[dict[str, Any]] = []
    for flavor, f in sorted(flavors.items(), key=lambda kv: (kv[0] != "cpu", kv[0])):
        spec: dict[str, Any] = {}
        if f["nodeLabels"]:
            spec["nodeLabels"] = f["nodeLabels"]
        if f["tolerations"]:
            spec["tolerations"] = f["tolerations"]
        objs.append({
            "apiVersion": "kueue.x-k8s.io/v1beta2",
            "kind": "ResourceFlavor",
            "metadata": {"name": flavor, "labels": {"app.kubernetes.io/part-of": "lora-exp"},
                         "annotations": {"lora-exp.io/profiles": ",".join(f["profiles"])}},
            "spec": spec,
        })
    # Example quotas, sized so that the largest profile of each flavor (all its nodes) fits once: raise them
    # to what your cluster holds. A resource may belong to one resource group only, so the CPU flavor sits
    # in the same group with a GPU quota of 0; Kueue tries the flavors in order and skips those whose
    # nodeLabels contradict the pod's nodeSelector (the GPU model).
    flavor_entries = []
    for flavor in sorted(flavors, key=lambda f: (f != "cpu", f)):
        ps = [profiles[n] for n in flavors[flavor]["profiles"]]
        cpu = max(_quantity(p["resources"]["requests"]["cpu"]) * p["nodes"] for p in ps)
        mem_gi = max(_quantity(p["resources"]["requests"]["memory"]) / 2**30 * p["nodes"] for p in ps)
        gpus = max(p["gpus"] * p["nodes"] for p in ps)
        flavor_entries.append({"name": flavor, "resources": [
            {"name": "cpu", "nominalQuota": _num(cpu)},
            {"name": "memory", "nominalQuota": f"{_num(mem_gi)}Gi"},
            {"name": "nvidia.com/gpu", "nominalQuota": gpus},
        ]})
    objs.append({
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "ClusterQueue",
        "metadata": {"name": "lora-exp", "labels": {"app.kubernetes.io/part-of": "lora-exp"}},
        "spec": {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
            "queueingStrategy": "BestEffortFIFO",
            "preemption": {"withinClusterQueue": "LowerPriority"},
            "resourceGroups": [{"coveredResources": ["cpu", "memory", "nvidia.com/gpu"], "flavors": flavor_entries}],
        },
    })
    objs.append({
        "apiVersion": "kueue.x-k8s.io/v1beta2",
        "kind": "LocalQueue",
        "metadata": {"name": "lora-exp", "namespace": NAMESPACE, "labels": {"app.kubernetes.io/part-of": "lora-exp"}},
        "spec": {"clusterQueue": "lora-exp"},
    })
    return objs


_SUFFIX = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity(q: Any) -> float:
    """A Kubernetes quantity ("500m", "16Gi", 4) as a number."""
    text = str(q)
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIX[suffix]
    return float(text)


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else round(x, 3)


def kueue_text() -> str:
    header = (
        "# Kueue objects for lora-exp (Kueue >= 0.15, API kueue.x-k8s.io/v1beta2), applied once per cluster:\n"
        "#   kubectl apply -f k8s/kueue.yaml\n"
        "# then install releases with --set kueue.queueName=lora-exp.\n"
        "# GENERATED from the hardware profiles in charts/values.yaml by `python tools/k8s_tools.py kueue`\n"
        "# (make -f mk/k8s.mk k8s-kueue); tests/k8s/test_cluster_manifests.py fails when it is stale.\n"
        "# One ResourceFlavor per GPU model (nodeLabels = the profiles' nodeSelector). The quotas are examples\n"
        "# (the largest profile of each flavor fits once): set nominalQuota to what your cluster really has.\n"
    )
    docs = [yaml.safe_dump(o, sort_keys=False, default_flow_style=False) for o in kueue_objects()]
    return header + "".join(f"---\n{d}" for d in docs)


# ------------------------------------------------------------------------------------------------
# Manifests for the security scan (make -f mk/k8s.mk k8s-scan)

SCAN_VARIANTS: dict[str, dict[str, Any]] = {
    # Every optional feature on: multi-node Indexed Job + Service, Kueue, HF token, MLflow with the
    # bundled PostgreSQL, basic auth and PVC artifacts.
    "everything-on": {
        "profile": "h100-80g-x8-n2",
        "kueue": {"queueName": "lora-exp"},
        "priorityClassName": "lora-exp-normal",
        "hf": {"existingSecret": "hf-token"},
        "mlflow": {"enabled": True, "postgresql": {"existingSecret": "lora-exp-mlflow-db"},
                   "auth": {"enabled": True, "existingSecret": "lora-exp-mlflow-admin"}},
    },
    # External database and S3/MinIO artifacts.
    "external-mlflow-stores": {
        "mlflow": {"enabled": True, "backendStore": {"existingSecret": "mlflow-db-uri"},
                   "artifacts": {"destination": "s3://mlflow/artifacts",
                                 "s3": {"endpointUrl": "http://minio:9000", "existingSecret": "minio"}}},
    },
}


def write_scan_manifests(out: Path) -> list[Path]:
    """Render every shipped values file and the scan variants, and copy k8s/*.yaml, into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.yaml"):
        old.unlink()
    written = []
    smoke = values_file(VALUES_DIR / "smoke.yaml")
    renders = {f"chart-{p.stem}": (values_file(p), p.stem) for p in shipped_values_files()}
    renders |= {f"chart-{k}": (deep_merge(smoke, v), "scan") for k, v in SCAN_VARIANTS.items()}
    for name, (values, release) in renders.items():
        raw = render_raw(values, release=release)
        text = "".join(f"---\n# Source: {p}\n{t.strip()}\n" for p, t in sorted(raw.items())
                       if not p.endswith("NOTES.txt") and t.strip())
        written.append(out / f"{name}.yaml")
        written[-1].write_text(text)
    for src in sorted((REPO / "k8s").glob("*.yaml")):
        written.append(out / f"k8s-{src.name}")
        written[-1].write_text(src.read_text())
    return written


# ------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="lora-exp Kubernetes packaging tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("schema", help="regenerate charts/values.schema.json (tools/chart_schema.py)")
    sub.add_parser("golden", help="regenerate tests/k8s/golden/*.yaml")
    sub.add_parser("kueue", help="regenerate k8s/kueue.yaml")
    sc = sub.add_parser("scan-manifests", help="write the manifests the security scan reads")
    sc.add_argument("out", type=Path)
    r = sub.add_parser("render", help="print the rendered chart for a values file")
    r.add_argument("values")
    r.add_argument("--set-json", default="{}", help="extra values as JSON, merged over the file")
    args = ap.parse_args(argv)
    if args.cmd == "schema":
        SCHEMA.write_text(schema_text(generated_schema()))
        print(f"wrote {SCHEMA.relative_to(REPO)}")
    elif args.cmd == "golden":
        GOLDEN_DIR.mkdir(exist_ok=True)
        wanted = {golden_path(p) for p in shipped_values_files()}
        for stale in set(GOLDEN_DIR.glob("*.yaml")) - wanted:
            stale.unlink()
            print(f"removed {stale.relative_to(REPO)}")
        for p in shipped_values_files():
            golden_path(p).write_text(golden_text(p))
            print(f"wrote {golden_path(p).relative_to(REPO)}")
    elif args.cmd == "kueue":
        KUEUE.write_text(kueue_text())
        print(f"wrote {KUEUE.relative_to(REPO)}")
    elif args.cmd == "scan-manifests":
        files = write_scan_manifests(args.out)
        print(f"wrote {len(files)} manifest files to {args.out}")
    elif args.cmd == "render":
        values = deep_merge(values_file(args.values), json.loads(args.set_json))
        for path, text in sorted(render_raw(values, release=Path(args.values).stem).items()):
            print(f"---\n# Source: {path}\n{text.strip()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
