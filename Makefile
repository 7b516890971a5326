# One command each, from a clean clone: `make test` and `make demo`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup test-env tools test test-fast lint typecheck pytest gpu-test bench demo clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The CPU build of torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# SkyPilot (the `handoff --engine skypilot` tests parse our task with its own parser) gets a
# venv of its own: its click<8.2 pin conflicts with huggingface_hub's click>=8.4.2.
SKY_VENV := .venv-sky
SKY_STAMP := $(SKY_VENV)/.installed
$(SKY_STAMP):
	$(PY) -m venv $(SKY_VENV)
	$(SKY_VENV)/bin/pip install --quiet 'skypilot>=0.14.1,<0.15'
	touch $(SKY_STAMP)

setup: $(STAMP)

# What the tests need besides the project's venv (`make demo` needs none of it).
test-env: setup tools $(SKY_STAMP)

# shellcheck lints the GCE startup script in the tests (Debian package; needs root or sudo).
tools:
	@command -v shellcheck >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq shellcheck >/dev/null; \
	  elif command -v sudo >/dev/null 2>&1; then sudo apt-get update -qq && sudo apt-get install -y -qq shellcheck >/dev/null; \
	  else echo "shellcheck is missing: apt-get install shellcheck (the startup-script tests need it)"; fi; }

lint: setup
	$(BIN)/ruff check colabjob tests benchmarks

typecheck: setup
	$(BIN)/mypy

# pytest-xdist workers: one per core, at most 2 (CI's machines have 2, and the multi-rank tests
# start 2 processes each); `make test JOBS=0` runs in one process. One torch thread per worker:
# two workers of 2 threads each would oversubscribe 2 cores. worksteal: a worker that runs out
# takes half of the other's queue, so no long test is left queued behind another at the end.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); echo $$(( n < 2 ? n : 2 )))
PYTEST = OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(BIN)/pytest -n $(JOBS) --dist worksteal

pytest: test-env
	$(PYTEST) -q

test: lint typecheck pytest

# The quick tier for the edit-test loop (under 2 minutes): the unmarked tests only. `make test`
# still runs everything, the slow, emulator and GPU-marked tests included.
test-fast: test-env
	$(PYTEST) -q -m "not slow and not gcs and not s3 and not gpu"

# The GPU suite (tests/gpu, a few minutes on one GPU). Without a CUDA device it fails, not
# passes vacuously: on a GPU machine `make setup` gets the CUDA build of torch from PyPI.
gpu-test: setup
	@$(BIN)/python -c "import sys, torch; sys.exit(0) if torch.cuda.is_available() else \
	  sys.exit(f'make gpu-test: no CUDA device (torch {torch.__version__}, CUDA build: ' \
	  f'{torch.version.cuda or \"none\"}); run it on a machine with an NVIDIA GPU')"
	CUBLAS_WORKSPACE_CONFIG=:4096:8 $(BIN)/pytest -m gpu tests/gpu -ra

bench: setup
	@set -e; for b in benchmarks/*.py; do echo "== $$b"; $(BIN)/python $$b; done

demo: setup
	$(BIN)/colabjob demo

clean:
	rm -rf $(VENV) $(SKY_VENV) .pytest_cache .mypy_cache .ruff_cache
