# The README's two commands: `make run` (the study end to end on the built-in data) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PREFECT_HOME := $(CURDIR)/.prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export PREFECT_LOGGING_LEVEL ?= INFO
export GX_ANALYTICS_ENABLED := false
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export RAY_AUTH_MODE := disabled
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup run study test bench clean-staging

setup: $(VENV)/.installed .dvc/config

$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@touch $@

.dvc/config:
	dvc init --quiet

run: setup
	python -m flows.pipeline

study: setup
	python -m flows.study

test: setup
	python -m pytest

bench: setup
	for b in params curate poison objectives pretrain accumulation loader clean evaluate memory shard_check; do python benchmarks/$$b.py || exit 1; done

clean-staging:
	rm -rf data/staging
