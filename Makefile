# Two commands do all set-up on a fresh machine with Python 3.11+ and make:
#   make demo   run the whole lifecycle on the embedded default and leave it running
#   make test   lint and the test suite
SHELL := /bin/bash
.DEFAULT_GOAL := help
UV ?= $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
PYTHON_BIN ?= $(shell command -v python3 2>/dev/null)
VENV := .venv
export UV_PYTHON_DOWNLOADS := never
# Every Airflow import creates $AIRFLOW_HOME (default ~/airflow): keep the demo's inside the project.
# The local stack is a development tool in devstack/ (package modelops_dev), outside the runtime package:
# neither the wheel nor the Docker image ships it, so it is put on PYTHONPATH here.
DEMO_ENV := AIRFLOW_HOME=$(CURDIR)/.demo/airflow PYTHONPATH=$(CURDIR)/devstack$${PYTHONPATH:+:$$PYTHONPATH}

.PHONY: help install demo down status restart stack stack-down stack-status stack-test bench-stack test lint unit e2e bench clean

help:
	@echo "make demo   run two models through the six-stage lifecycle on this machine (leaves services running)"
	@echo "make down   stop every process make demo started"
	@echo "make status show what make demo started, where it listens, and its restarts"
	@echo "make restart SERVICE=gateway   stop one service of make demo and start it again"
	@echo "make stack  run docker-compose.yaml's production shape as processes here: PostgreSQL, Celery (2 workers), Redis, S3 (moto)"
	@echo "make stack-down  stop it and drop its databases"
	@echo "make test   ruff + the whole test suite"
	@echo "make bench  print speed and memory figures (benchmarks/)"
	@echo "make bench-stack  20 models at once through the chain on the production stack (most of an hour)"

$(UV):
	@echo "uv not found: installing it into ~/.local/bin with pip"
	$(PYTHON_BIN) -m pip install --quiet --user uv || $(PYTHON_BIN) -m pip install --quiet --user --break-system-packages uv

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	@touch $@

install: $(VENV)/.synced

demo: install
	$(DEMO_ENV) $(VENV)/bin/python -m modelops_dev up

down:
	@if [ -x $(VENV)/bin/python ]; then $(DEMO_ENV) $(VENV)/bin/python -m modelops_dev down; else echo "nothing to stop"; fi

status: install
	$(DEMO_ENV) $(VENV)/bin/python -m modelops_dev status

# A service that exits unasked is restarted by the demo's supervisor (make status: restarts, FAILED).
restart: install
	@if [ -z "$(SERVICE)" ]; then echo "usage: make restart SERVICE=<name>, a name make status shows"; exit 2; fi
	$(DEMO_ENV) $(VENV)/bin/python -m modelops_dev restart $(SERVICE)

# The production shape (docker-compose.yaml) as processes on this machine: README "The production stack".
stack: install
	$(DEMO_ENV) $(VENV)/bin/python -m modelops_dev stack up

stack-down:
	@if [ -x $(VENV)/bin/python ]; then $(DEMO_ENV) $(VENV)/bin/python -m modelops_dev stack down; else echo "nothing to stop"; fi

stack-status: install
	$(DEMO_ENV) $(VENV)/bin/python -m modelops_dev stack status

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The production-stack tier (tests/stack: ~10 min, mostly waiting on the scheduler and retries) runs beside
# the rest (~8 min, mostly CPU), so the whole suite fits in CI's 15 minutes; its output follows the rest's.
test: lint
	@stack_log=$$(mktemp); \
	$(VENV)/bin/pytest tests/stack -p no:cacheprovider > $$stack_log 2>&1 & stack_pid=$$!; \
	$(VENV)/bin/pytest --ignore=tests/stack; rest=$$?; \
	wait $$stack_pid; stack=$$?; \
	echo "== tests/stack (the production stack, run beside the rest)"; cat $$stack_log; rm -f $$stack_log; \
	exit $$(( rest != 0 || stack != 0 ))

stack-test: install
	$(VENV)/bin/pytest tests/stack

unit: install
	$(VENV)/bin/pytest tests/dags tests/unit

e2e: install
	$(VENV)/bin/pytest tests/e2e

# bench_stack_models.py starts the production stack twice and takes most of an hour: make bench-stack.
bench: install
	@for script in benchmarks/bench_*.py; do case $$script in *bench_stack_*) continue;; esac; \
		echo "== $$script"; $(VENV)/bin/python $$script || exit 1; done

bench-stack: install
	$(DEMO_ENV) $(VENV)/bin/python benchmarks/bench_stack_models.py

clean: down
	rm -rf .demo .modelops
