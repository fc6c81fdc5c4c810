# `make pipeline` and `make test` each set up .venv on first use (from requirements.lock; `make
# test` adds requirements-hf.lock, the `hf` extra).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HF_STAMP := $(VENV)/.installed-hf

# Quiet and offline: no telemetry, no hub lookups at run time.
export DO_NOT_TRACK := true
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# The flows' temporary Prefect server migrates a fresh database on its first start: on a busy
# 2-core machine that can take longer than Prefect's default wait of 20 s
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export PREFECT_HOME := $(CURDIR)/.prefect
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: pipeline retrain test install repro promote mlflow-ui mlflow-server serve \
	prefect-server worker deploy clean

MLFLOW_PORT ?= 5000
SERVE_PORT ?= 5001
MODEL ?= bigmodel-bert-cls   # any registered model: bigmodel-<finetune or GPT pretrain run>
POOL ?= bigmodel
STORE := sqlite:///$(CURDIR)/mlflow.db

install: $(STAMP)

# uv installs the lock in about a quarter of pip's time (33 s against 120 s on 2 cores,
# benchmarks/RESULTS.md), byte-compiling as it goes (stages import faster, even where
# PYTHONDONTWRITEBYTECODE is set); it reads pip's find-links (a local torch wheel), and pip
# takes over if uv cannot be installed or fails.
UV_VERSION := 0.13.9
FIND_LINKS := $(shell $(PYTHON) -m pip config list 2>/dev/null | sed -n "s/.*find-links='\([^']*\)'.*/\1/p" | head -1)
UV_FLAGS := --python $(BIN)/python --quiet --compile-bytecode $(if $(FIND_LINKS),--find-links $(FIND_LINKS))

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	( $(BIN)/python -m pip install --quiet uv==$(UV_VERSION) 2>&1 | grep -v '^WARNING: Location' ; \
	  $(BIN)/uv pip install $(UV_FLAGS) -r requirements.lock && $(BIN)/uv pip install $(UV_FLAGS) --no-deps -e . ) \
	|| ( echo "uv failed: installing with pip" && \
	  $(BIN)/python -m pip install --quiet -r requirements.lock 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0 && \
	  $(BIN)/python -m pip install --quiet --no-deps -e . 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0 )
	touch $(STAMP)

# the `hf` extra (transformers, onnx, onnxruntime: `bigmodel export` and its tests), pinned
# against the main lock; the pipeline does not need it
$(HF_STAMP): $(STAMP) requirements-hf.lock
	( $(BIN)/uv pip install $(UV_FLAGS) -c requirements.lock -r requirements-hf.lock ) \
	|| ( echo "uv failed: installing with pip" && \
	  $(BIN)/python -m pip install --quiet -c requirements.lock -r requirements-hf.lock 2>&1 | grep -v '^WARNING: Location' ; test $${PIPESTATUS[0]} -eq 0 )
	touch $(HF_STAMP)

pipeline: $(STAMP)
	$(BIN)/python -m flows.pipeline

test: $(STAMP) $(HF_STAMP)
	$(BIN)/python -m pytest

retrain: $(STAMP)
	$(BIN)/python -m flows.retrain

# refresh the data snapshots (forced, cheap stages), then let DVC rerun whatever that reaches
repro: $(STAMP)
	$(BIN)/dvc stage list --name-only | grep '^source@' | xargs -n1 $(BIN)/dvc repro --force --single-item \
		&& $(BIN)/dvc repro

promote: $(STAMP)
	$(BIN)/bigmodel promote

mlflow-ui: $(STAMP)
	@echo "open http://127.0.0.1:$(MLFLOW_PORT)/#/experiments/1?workflowType=machine_learning (the training runs)"
	$(BIN)/mlflow ui --backend-store-uri $(STORE) --host 127.0.0.1 --port $(MLFLOW_PORT)

mlflow-server: $(STAMP)
	infra/mlflow-server.sh $(MLFLOW_PORT)

serve: $(STAMP)
	MLFLOW_TRACKING_URI=$(STORE) $(BIN)/mlflow models serve -m models:/$(strip $(MODEL))@champion \
		--env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

# Deployments: `make prefect-server` (one terminal), `make worker` (another), `make deploy`.
prefect-server: $(STAMP)
	$(BIN)/prefect server start --host 127.0.0.1

worker: $(STAMP)
	PREFECT_API_URL=http://127.0.0.1:4200/api $(BIN)/prefect worker start --pool $(POOL) --limit 1

deploy: $(STAMP)
	export PREFECT_API_URL=http://127.0.0.1:4200/api; \
	$(BIN)/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || \
		$(BIN)/prefect work-pool create $(POOL) --type process; \
	$(BIN)/prefect work-pool set-concurrency-limit $(POOL) 1 && \
	$(BIN)/prefect --no-prompt deploy --all

clean:
	rm -rf data models reports mlflow.db mlartifacts .prefect
