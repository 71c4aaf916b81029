# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test unit integration deploy-tools protos bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade "pip>=24"
	# the CPU build of torch first: a bare torch requirement would pull a multi-GB CUDA build
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# Standard KServe / Triton clients for the inference tests, in their own venv: tritonclient pins protobuf < 7,
# which the project's protobuf 7 stubs cannot share a process with.
CLIENTS_VENV := .venv-clients
CLIENTS_STAMP := $(CLIENTS_VENV)/.installed

$(CLIENTS_STAMP):
	test -x $(CLIENTS_VENV)/bin/python || $(PYTHON) -m venv $(CLIENTS_VENV)
	$(CLIENTS_VENV)/bin/python -m pip install --quiet "tritonclient[grpc]==2.73.0" numpy==2.4.6 protobuf==6.33.6
	touch $(CLIENTS_STAMP)

# Debian packages the deployment tests run (tests/deploy): promtool and the Prometheus server (prometheus),
# docker-compose (`docker-compose config`), and kubectl for `kubectl kustomize` where no kubectl is installed
# (Debian's kubernetes-client). Once per machine (the stamp); as root, or through sudo.
DEPLOY_TOOLS_STAMP := .deploy-tools.installed

$(DEPLOY_TOOLS_STAMP):
	@SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	KUBECTL=$$(command -v kubectl >/dev/null 2>&1 || echo kubernetes-client); \
	set -ex; \
	$$SUDO apt-get update -qq; \
	$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		prometheus docker-compose $$KUBECTL
	promtool --version >/dev/null && prometheus --version >/dev/null && docker-compose version >/dev/null
	kubectl kustomize --help >/dev/null
	touch $(DEPLOY_TOOLS_STAMP)

deploy-tools: $(DEPLOY_TOOLS_STAMP)

demo: $(STAMP)
	$(VENV)/bin/clisonix demo

test: $(STAMP) $(CLIENTS_STAMP) $(DEPLOY_TOOLS_STAMP)
	$(PY) -m pytest

unit: $(STAMP)
	$(PY) -m pytest tests/unit

integration: $(STAMP) $(CLIENTS_STAMP) $(DEPLOY_TOOLS_STAMP)
	$(PY) -m pytest tests/integration tests/deploy

# Regenerate the committed protobuf / gRPC stubs beside their .proto files.
protos: $(STAMP)
	$(PY) -m services.common.protogen protos

bench: $(STAMP)
	$(VENV)/bin/clisonix bench ingest

# Train, distill, prune, export, evaluate and report the ECG beat models into models/ (about 6 min on 2 cores).
.PHONY: models
models: $(STAMP)
	$(VENV)/bin/clisonix model all

lint: $(STAMP)
	$(VENV)/bin/ruff check services tests bench liam_core
	$(VENV)/bin/ruff format --check services tests bench liam_core
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) $(CLIENTS_VENV) .pytest_cache $(DEPLOY_TOOLS_STAMP)
