# Two commands: `make demo` (the main job) and `make test` (the suite). Both set up everything first:
# Debian's ffmpeg, a virtual environment in .venv/, the project and its pinned dependencies.
# The install is skipped while .venv/.installed is newer than pyproject.toml and constraints.txt.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PIP := $(PY) -m pip --disable-pip-version-check
# --compile-bytecode: pip compiles .pyc at install time, uv does not by default; without them, where
# PYTHONDONTWRITEBYTECODE is set (as on this project's machines) every process compiles what it imports.
UV := $(VENV)/bin/uv pip install --python $(PY) --compile-bytecode
# Keep every tool's state inside the project (see pipelines/env.py for the same defaults in Python).
STATE := $(CURDIR)/.state
export MAV_STATE_DIR := $(STATE)
export PREFECT_HOME := $(STATE)/prefect
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true
export NO_ALBUMENTATIONS_UPDATE := 1
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test install system-deps bench clean help

help:
	@echo "make demo   - set up, then run the main job end to end (mav demo)"
	@echo "make test   - set up, then run the whole test suite"
	@echo "make bench  - set up, then run the benchmarks into benchmarks/results/"
	@echo "make clean  - remove the environment and local state"

install: $(STAMP)

system-deps:
	@command -v ffmpeg >/dev/null && command -v ffprobe >/dev/null || { \
	  echo "installing Debian package ffmpeg"; \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) apt-get update -qq && \
	  $$( [ "$$(id -u)" = 0 ] || echo sudo ) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null; }

$(STAMP): pyproject.toml constraints.txt | system-deps
	@echo "building $(VENV) (a few minutes the first time)"
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	@# uv (from PyPI, pinned) installs the ~4 GB stack in parallel, where pip installs one wheel at a time.
	$(PIP) install -q -c constraints.txt uv
	$(UV) -q -c constraints.txt -e .
	@# The dataset tools' declared requirements conflict with the stack; their real needs are in pyproject.
	$(UV) -q --no-deps -c constraints.txt img2dataset video2dataset
	@mkdir -p $(PREFECT_HOME)  # prefect makes only the last folder of its home; .state may not exist yet
	$(PY) -c "import torch, torchvision, ray, prefect, mlflow, open_clip, decord, webdataset, img2dataset, video2dataset"
	@touch $(STAMP)

demo: $(STAMP) system-deps
	$(VENV)/bin/mav demo

test: $(STAMP) system-deps
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

bench: $(STAMP) system-deps
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) $(STATE)
