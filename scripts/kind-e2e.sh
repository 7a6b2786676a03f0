#!/usr/bin/env bash
# End-to-end smoke test of the Kubernetes packaging on a throw-away kind cluster.
#
#   scripts/kind-e2e.sh              # create cluster, build + load images, install, wait, check MLflow
#   KEEP_CLUSTER=1 scripts/kind-e2e.sh   # leave the cluster up afterwards (to poke around)
#
# Needs: docker, kind, kubectl, helm (v3.18+ or v4) and internet access from the kind node (the tiny
# model sshleifer/tiny-gpt2 and the sst2 data set come from the Hugging Face hub; postgres from Docker Hub).
# What it does, in order:
#   1. kind cluster "$CLUSTER"           5. helm upgrade --install smoke charts/ -f values/smoke.yaml
#   2. docker build the cpu + MLflow images     (bundled PostgreSQL + MLflow, one CPU Job)
#   3. kind load them (+ postgres)       6. wait for the Job; on failure print its pods' logs
#   4. namespace, PVCs (RWO on kind),    7. ask the MLflow server for the run: status FINISHED
#      the database password Secret
set -euo pipefail

CLUSTER=${CLUSTER:-lora-exp-e2e}
NS=lora-exp
RELEASE=smoke
TIMEOUT=${TIMEOUT:-1200}   # seconds for the Job
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

APP_VERSION=$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/Chart.yaml)
JOB_IMAGE="lora-exp:${APP_VERSION}-cpu"                 # the chart's default for the cpu profile
MLFLOW_IMAGE="lora-exp-mlflow:$(sed -n 's/^mlflow==//p' mlflow_server/requirements.lock)"
PG_IMAGE="postgres:$(sed -n '/^  postgresql:/,/tag:/s/^ *tag: *"\(.*\)"$/\1/p' charts/values.yaml)"

log() { printf '\n==> %s\n' "$*"; }

for tool in docker kind kubectl helm; do
  command -v "$tool" >/dev/null || { echo "missing: $tool" >&2; exit 1; }
done

log "1. kind cluster $CLUSTER"
if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --name "$CLUSTER" --wait 120s
fi
kubectl config use-context "kind-$CLUSTER" >/dev/null
if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
  trap 'log "deleting cluster $CLUSTER (KEEP_CLUSTER=1 keeps it)"; kind delete cluster --name "$CLUSTER"' EXIT
fi

log "2. build $JOB_IMAGE and $MLFLOW_IMAGE"
GIT_SHA=$(git rev-parse HEAD 2>/dev/null || echo unknown)
DOCKER_BUILDKIT=1 docker build -f images/Dockerfile --target cpu \
  --build-arg GIT_SHA="$GIT_SHA" --build-arg VERSION="$APP_VERSION" -t "$JOB_IMAGE" .
DOCKER_BUILDKIT=1 docker build --build-arg GIT_SHA="$GIT_SHA" -t "$MLFLOW_IMAGE" mlflow_server/
docker pull -q "$PG_IMAGE"

log "3. load images into the cluster"
kind load docker-image --name "$CLUSTER" "$JOB_IMAGE" "$MLFLOW_IMAGE" "$PG_IMAGE"

log "4. namespace, volumes, database secret"
kubectl apply -f k8s/namespace.yaml
# kind's local-path provisioner has no ReadWriteMany; one node, so ReadWriteOnce is equivalent here.
sed 's/ReadWriteMany/ReadWriteOnce/' k8s/storage.yaml | kubectl apply -f -
kubectl -n "$NS" create secret generic lora-exp-mlflow-db \
  --from-literal=password="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" --dry-run=client -o yaml \
  | kubectl apply -f -

log "5. helm install $RELEASE with values/smoke.yaml"
helm upgrade --install "$RELEASE" charts/ -n "$NS" -f values/smoke.yaml
kubectl -n "$NS" rollout status "statefulset/${RELEASE}-lora-exp-postgresql" --timeout=5m
kubectl -n "$NS" rollout status "deploy/${RELEASE}-lora-exp-mlflow" --timeout=5m

log "6. wait for the Job"
JOB=$(kubectl -n "$NS" get jobs -l "app.kubernetes.io/instance=$RELEASE" -o jsonpath='{.items[0].metadata.name}')
deadline=$((SECONDS + TIMEOUT))
while :; do
  succeeded=$(kubectl -n "$NS" get job "$JOB" -o jsonpath='{.status.succeeded}')
  failed=$(kubectl -n "$NS" get job "$JOB" -o jsonpath='{.status.conditions[?(@.type=="Failed")].status}')
  if [[ "$succeeded" == 1 ]]; then
    echo "job $JOB succeeded"
    break
  fi
  if [[ "$failed" == True || $SECONDS -gt $deadline ]]; then
    echo "job $JOB did not succeed" >&2
    kubectl -n "$NS" describe job "$JOB" >&2 || true
    kubectl -n "$NS" logs "job/$JOB" --all-containers --tail=200 >&2 || true
    exit 1
  fi
  sleep 10
done
kubectl -n "$NS" logs "job/$JOB" --tail=20

log "7. the run is in MLflow"
EXPERIMENT=$(sed -n 's/^  name: *//p' values/smoke.yaml | head -1)
kubectl -n "$NS" exec "deploy/${RELEASE}-lora-exp-mlflow" -- python -c "
import mlflow
client = mlflow.MlflowClient('http://localhost:5000')
exp = client.get_experiment_by_name('$EXPERIMENT')
assert exp is not None, 'no MLflow experiment $EXPERIMENT'
runs = client.search_runs([exp.experiment_id])
assert runs, 'no run in experiment $EXPERIMENT'
run = runs[0]
print('run', run.info.run_name, run.info.status, dict(sorted(run.data.metrics.items())))
assert run.info.status == 'FINISHED', run.info.status
"
log "e2e OK"
