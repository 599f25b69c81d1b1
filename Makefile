# The README's two commands: `make run` (the default study end to end on the built-in data) and `make test`.
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

.PHONY: setup run pipeline defences attacks test test-all browser bench clean-staging

setup: $(VENV)/.installed .dvc/config .dvc/plots.html

$(VENV)/.installed: pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[dev]'
	@touch $@

.dvc/config:
	dvc init --quiet

# `dvc plots show` offline: Vega inline (.dvc/config's plots.html_template), not from a CDN
.dvc/plots.html: $(VENV)/.installed
	python -m core.offline_plots $@

run: setup
	python -m flows.study

pipeline: setup
	python -m flows.pipeline

# the defence matrix (params/defences.yaml): pre-training defences x objectives x cleaning defences, 3 seeds
defences: setup
	python -m flows.study --params params/defences.yaml

# the attacks study (params/attacks.yaml): noise patch, optimised patch, caption-side poisoning at 500 poisons, 3 seeds
attacks: setup
	python -m flows.study --params params/attacks.yaml

test: setup browser
	python -m pytest -m "not slow"

test-all: setup browser
	python -m pytest

# the browser tests' Chromium (Debian's chromium and chromium-driver), installed when missing
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) || \
	  echo "could not install chromium and chromium-driver (apt-get, as root): the browser tests will fail"

bench: setup
	for b in params curate poison objectives pretrain accumulation loader clean evaluate memory shard_check defences attacks; do python benchmarks/$$b.py || exit 1; done

clean-staging:
	rm -rf data/staging
