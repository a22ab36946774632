# Two entry points (see README): `make train` and `make test`. Both create .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
export WANDB_MODE ?= disabled
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: setup train test test-slow

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

train: setup
	$(PY) -m peer_jax.train --gin_file=configs/runs/tiny_cpu.gin --workdir=runs/tiny_cpu

test: setup
	$(PY) -m pytest -q -n 2 --durations=15 -m "not slow" tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests
