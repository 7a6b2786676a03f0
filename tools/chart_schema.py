"""Generate charts/values.schema.json from its two sources, so no fact is written twice:

- the experiment part from the pydantic spec (``lora_exp.config.jsonschema``, what ``lora-exp schema`` prints);
- the chart part from the pydantic models below (types and constraints only) plus one description per key,
  taken from the comment block right above the key in charts/values.yaml (helm-docs style: ``# -- text``;
  the keys of the first hardware profile document every profile). A key without a description, or a key in
  values.yaml that the models do not know, fails the generation.

    python tools/chart_schema.py            # write charts/values.schema.json
    python tools/chart_schema.py --check    # exit 1 if the committed file differs (CI: tests/k8s)
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts"
VALUES = CHART / "values.yaml"
SCHEMA = CHART / "values.schema.json"
EXPERIMENT_SCHEMA_ID = "experiment.schema.json"
TRAINING_REF = f"{EXPERIMENT_SCHEMA_ID}#/$defs/TrainingSpec"

# ------------------------------------------------------------------------------------------------
# The chart's values: types and constraints. Descriptions live in values.yaml, except those of the generic
# types used in several places (resources, images, volume claims, secret references), described once here.

Quantity = Annotated[
    Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")]
    | Annotated[float, Field(ge=0)],
    Field(description="A Kubernetes resource quantity, e.g. 500m, 16Gi."),
]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]
AbsPath = Annotated[str, StringConstraints(pattern="^/")]
Digest = Annotated[str, StringConstraints(pattern="^(sha256:[a-f0-9]{64})?$")]
PullPolicy = Literal["Always", "IfNotPresent", "Never"]
StrMap = dict[str, str]
Objects = list[dict[str, Any]]


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Resources(Closed):
    """Container resources (requests and limits)."""

    requests: dict[str, Quantity] = Field({}, description="Resource requests, e.g. {cpu: 500m, memory: 1Gi}.")
    limits: dict[str, Quantity] = Field({}, description="Resource limits, e.g. {memory: 2Gi}.")


class EnvVar(Closed):
    name: NonEmpty
    value: str = ""
    valueFrom: dict[str, Any] = {}


class Image(Closed):
    repository: NonEmpty = Field(description="Image repository (registry/name).")
    tag: str = Field("", description="Image tag.")
    digest: Digest = Field("", description="sha256:... digest; when set the image is pulled by digest.")
    pullPolicy: PullPolicy = Field("IfNotPresent", description="Kubernetes imagePullPolicy.")


class Job(Closed):
    runs: Annotated[list[str], Field(json_schema_extra={"uniqueItems": True})] = []
    runProfiles: StrMap = {}
    backoffLimit: Annotated[int, Field(ge=0)] = 0
    activeDeadlineSeconds: Annotated[int, Field(ge=0)] = 0
    ttlSecondsAfterFinished: Annotated[int, Field(ge=0)] = 0
    terminationGracePeriodSeconds: Annotated[int, Field(ge=0)] = 0
    validateSpec: bool = True
    planCheck: bool = True
    planMargin: Annotated[float, Field(ge=0, le=1)] = 0.1
    validateResources: Resources = Resources()
    extraEnv: list[EnvVar] = []
    podAnnotations: StrMap = {}
    podLabels: StrMap = {}
    nodeSelector: StrMap = {}
    tolerations: Objects = []
    affinity: dict[str, Any] = {}


class Torchrun(Closed):
    rdzvBackend: Literal["c10d", "static"] = "c10d"
    port: Annotated[int, Field(ge=1)] = 1
    clusterDomain: NonEmpty = "cluster.local"
    joinTimeoutSeconds: Annotated[int, Field(ge=1)] = 1
    maxRestarts: Annotated[int, Field(ge=0)] = 0


class PullSecret(Closed):
    name: str


class ServiceAccount(Closed):
    create: bool = True
    name: str = ""


class PodSecurity(Closed):
    runAsUser: Annotated[int, Field(ge=1)] = 1
    runAsGroup: Annotated[int, Field(ge=1)] = 1
    fsGroup: Annotated[int, Field(ge=1)] = 1


class NetworkPolicy(Closed):
    enabled: bool = True
    mlflowExtraIngressFrom: Objects = []


class Kueue(Closed):
    queueName: str = ""
    priorityClass: str = ""


class Claim(Closed):
    existingClaim: str = Field("", description="PersistentVolumeClaim to mount (empty: an emptyDir).")
    mountPath: AbsPath = Field("/", description="Where the volume is mounted in the containers.")


class CacheClaim(Claim):
    readOnly: bool = Field(False, description="Mount read-only.")


class Tmp(Closed):
    sizeLimit: Quantity = "0"


class Persistence(Closed):
    outputs: Claim = Claim()
    hfCache: CacheClaim = CacheClaim()
    data: Claim = Claim()
    tmp: Tmp = Tmp()


class HF(Closed):
    existingSecret: str = ""
    tokenKey: NonEmpty = "token"


class Credentials(Closed):
    existingSecret: str = Field("", description="Secret holding the credentials (referenced, never created).")
    usernameKey: NonEmpty = Field("username", description="Key of the username in the Secret.")
    passwordKey: NonEmpty = Field("password", description="Key of the password in the Secret.")


class ArtifactVolume(Closed):
    size: Quantity = "0"
    storageClass: str = ""
    existingClaim: str = ""


class S3(Closed):
    endpointUrl: str = ""
    existingSecret: str = ""
    accessKeyIdKey: NonEmpty = "AWS_ACCESS_KEY_ID"
    secretAccessKeyKey: NonEmpty = "AWS_SECRET_ACCESS_KEY"


class Artifacts(Closed):
    destination: str = ""
    persistence: ArtifactVolume = ArtifactVolume()
    s3: S3 = S3()


class BackendStore(Closed):
    existingSecret: str = ""
    uriKey: NonEmpty = "uri"


class Auth(Credentials):
    enabled: bool = False
    defaultPermission: Literal["READ", "EDIT", "MANAGE", "NO_PERMISSIONS"] = "READ"
    databaseUri: str = ""


class DatabaseVolume(Closed):
    size: Quantity = "0"
    storageClass: str = ""


class PostgreSQL(Closed):
    image: Image = Image(repository="postgres")
    database: NonEmpty = "mlflow"
    username: NonEmpty = "mlflow"
    existingSecret: str = ""
    passwordKey: NonEmpty = "password"
    persistence: DatabaseVolume = DatabaseVolume()
    resources: Resources = Resources()


class MLflow(Closed):
    enabled: bool = False
    trackingUri: str = ""
    tracking: Credentials = Credentials()
    image: Image = Image(repository="lora-exp-mlflow")
    port: Annotated[int, Field(ge=1)] = 1
    workers: Annotated[int, Field(ge=1)] = 1
    allowedHosts: list[str] = []
    resources: Resources = Resources()
    artifacts: Artifacts = Artifacts()
    backendStore: BackendStore = BackendStore()
    auth: Auth = Auth()
    postgresql: PostgreSQL = PostgreSQL()


class Profile(Closed):
    description: str = ""
    gpus: Annotated[int, Field(ge=0)]
    gpuMemoryGiB: Annotated[float, Field(ge=0)] = 0
    costPerGpuHour: Annotated[float, Field(ge=0)] = 0
    nodes: Annotated[int, Field(ge=1)]
    resources: Resources
    shmSize: Quantity
    nodeSelector: StrMap = {}
    tolerations: Objects = []
    training: dict[str, Any] = {}  # replaced by a reference to the spec's TrainingSpec


# Profile names become parts of Kubernetes names and labels.
PROFILE_NAMES = {"pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 50}


class ChartValues(Closed):
    nameOverride: str = ""
    fullnameOverride: str = ""
    profile: str = "cpu"
    job: Job = Job()
    torchrun: Torchrun = Torchrun()
    image: Image = Image(repository="lora-exp")
    imagePullSecrets: list[PullSecret] = []
    serviceAccount: ServiceAccount = ServiceAccount()
    podSecurity: PodSecurity = PodSecurity()
    priorityClassName: str = ""
    networkPolicy: NetworkPolicy = NetworkPolicy()
    kueue: Kueue = Kueue()
    persistence: Persistence = Persistence()
    airGapped: bool = False
    hf: HF = HF()
    mlflow: MLflow = MLflow()
    profiles: Annotated[dict[str, Profile], Field(min_length=1, json_schema_extra={"propertyNames": PROFILE_NAMES})] \
        = {}
    experiment: dict[str, Any] = {}  # replaced by the spec's own schema


# ------------------------------------------------------------------------------------------------
# Descriptions from values.yaml

_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.\-/]+):(\s|$)")


def descriptions(text: str) -> dict[tuple[str, ...], str]:
    """``{key path: description}``: the comment block right above each key (no blank line between)."""
    out: dict[tuple[str, ...], str] = {}
    stack: list[tuple[int, str]] = []
    block: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            block.append(stripped.lstrip("#").strip())
            continue
        m = _KEY.match(line)
        if not stripped or m is None:
            block = []
            continue
        indent = len(m["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, m["key"]))
        if block:
            words = " ".join(block)
            out[tuple(k for _, k in stack)] = words.removeprefix("-- ").removeprefix("--").strip()
        block = []
    return out


def _node_at(schema: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any] | None:
    """The schema node for a values path; map entries (``profiles.<name>``) use additionalProperties."""
    node = schema
    for key in path:
        props = node.get("properties", {})
        if key in props:
            node = props[key]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return node


# ------------------------------------------------------------------------------------------------
# Assembly


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve local $refs (so each place can carry its own description) and drop titles and defaults
    (values.yaml holds the defaults)."""
    if isinstance(node, dict):
        if "$ref" in node and node["$ref"].startswith("#/$defs/"):
            target = copy.deepcopy(defs[node["$ref"].removeprefix("#/$defs/")])
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return _inline({**target, **rest}, defs)
        return {k: _inline(v, defs) for k, v in node.items() if k not in ("title", "default")}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def experiment_schema() -> dict[str, Any]:
    from lora_exp import plugins
    from lora_exp.config.jsonschema import json_schema

    plugins.load()

    return {"$id": EXPERIMENT_SCHEMA_ID, **json_schema()}


def chart_part(values_text: str) -> dict[str, Any]:
    raw = ChartValues.model_json_schema()
    defs = raw.pop("$defs", {})
    schema: dict[str, Any] = _inline(raw, defs)
    profile = schema["properties"]["profiles"]["additionalProperties"]
    profile["properties"]["training"] = {"$ref": TRAINING_REF}
    docs = descriptions(values_text)
    unknown = [".".join(p) for p in docs if p[0] != "experiment" and _node_at(schema, p) is None]
    if unknown:
        raise SystemExit(f"{VALUES}: keys the chart's schema does not know: {unknown} (tools/chart_schema.py)")
    described: set[int] = set()
    for path, text in docs.items():  # values.yaml's word wins over a generic type's; the first profile's wins
        node = _node_at(schema, path)
        if node is not None and id(node) not in described:
            node["description"] = text
            described.add(id(node))
    missing = sorted(".".join(p) for p in _leaf_paths(schema) if "description" not in (_node_at(schema, p) or {}))
    if missing:
        raise SystemExit(f"{VALUES}: keys without a description (a comment right above them): {missing}")
    return schema


def _leaf_paths(schema: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every property path of the chart part (map entries as '*'), the experiment excluded."""
    out = []
    for key, node in schema.get("properties", {}).items():
        if not prefix and key == "experiment":
            continue
        path = (*prefix, key)
        out.append(path)
        out += _leaf_paths(node, path)
        entry = node.get("additionalProperties")
        if isinstance(entry, dict) and "properties" in entry:
            out += [(*path, "*", *p[len(path) + 1:]) for p in _leaf_paths(entry, (*path, "*"))]
    return out


def generated_schema() -> dict[str, Any]:
    schema = chart_part(VALUES.read_text())
    schema["properties"]["experiment"] = experiment_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "lora-exp chart values",
        "description": "Chart settings plus the experiment spec. GENERATED by tools/chart_schema.py from the "
        "chart models there, the key comments of values.yaml and `lora-exp schema`: do not edit.",
        **schema,
    }


def schema_text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--check", action="store_true", help="compare with the committed file instead of writing")
    args = ap.parse_args(argv)
    text = schema_text(generated_schema())
    if args.check:
        if SCHEMA.read_text() != text:
            print(f"{SCHEMA.relative_to(REPO)} is stale: run python tools/chart_schema.py", file=sys.stderr)
            return 1
        return 0
    SCHEMA.write_text(text)
    print(f"wrote {SCHEMA.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
