# Everything runs inside one virtual environment, created on first use.
# torch is pinned first to the CPU wheel available on the dev/CI machines (see DEVELOPERS.md); on a GPU
# cluster install torch for your CUDA first, then `pip install -e .[deepspeed]`.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export WANDB_MODE ?= offline
PYTEST_ARGS ?=

.PHONY: install lint format test test-fast demo bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[dev,deepspeed,lm_eval]" "$(TORCH_PIN)"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the unit lane: no subprocess launches, no training beyond a few steps (tests marked slow are left out)
test-fast: install
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# DEMO_STEPS=N make demo: N training steps per PE (default: scripts/demo.py's, 600)
demo: install
	$(PY) scripts/demo.py $(if $(DEMO_STEPS),--steps $(DEMO_STEPS))

bench: install
	$(PY) scripts/bench/pe_overhead.py

clean:
	rm -rf outputs runs .pytest_cache
