# The tracking server's load test (issue 23): tools/load_test.py, PostgreSQL + the chart's `mlflow server` on
# loopback, simulated Jobs through the real spool. Included from the Makefile. Figures: docs/reliability.md.
#
#   load-test      the full measurement: 5..50 concurrent jobs x 1,000 steps (stops stepping once a phase
#                  breaks; fails unless up to 50 pass), 10 jobs behind 200 ms and 2 s of latency, 50 jobs
#                  through a server restart -> outputs/load-test/report.md (about 11 minutes on 2 cores)
#   load-test-ci   the same phases at 8 jobs x 200 steps, 1 s latency (under 5 minutes)
#   load-test-deps psycopg2-binary at the MLflow image's pinned version (mlflow_server/requirements.lock) in
#                  .load-test/site, for the server process only: the dev venv does not need it
#
# Needs PostgreSQL's server binaries (make engine installs them as root with apt-get).

VENV ?= .venv
PY ?= $(VENV)/bin/python
LOAD_SITE := .load-test/site
PSYCOPG2_PIN = $(shell grep '^psycopg2-binary==' mlflow_server/requirements.lock)
LOAD_TEST := PYTHONPATH=jobs $(PY) tools/load_test.py
LOAD_TEST_ARGS ?=

.PHONY: load-test load-test-ci load-test-deps

$(LOAD_SITE)/.installed: mlflow_server/requirements.lock
	$(PY) -m pip install -q --no-deps --target $(LOAD_SITE) '$(PSYCOPG2_PIN)'
	touch $@

load-test-deps: $(LOAD_SITE)/.installed

load-test: load-test-deps
	$(LOAD_TEST) --step-up 5,10,20,50 --steps 1000 --step-ms 20 --latency-ms 200,2000 --slow-jobs 10 \
		--restart --restart-jobs 50 --require-jobs 50 --deadline 300 --out outputs/load-test $(LOAD_TEST_ARGS)

load-test-ci: load-test-deps
	$(LOAD_TEST) --step-up 8 --steps 200 --step-ms 20 --latency-ms 1000 --slow-jobs 8 --restart --restart-jobs 8 \
		--require-jobs 8 --deadline 120 --out outputs/load-test-ci $(LOAD_TEST_ARGS)
