# The README names these targets. `make demo` and `make test` run `make setup`
# first, so each is one command on a fresh machine.
SHELL := /bin/bash
PY := .venv/bin/python
DATA ?= data/synthetic
RUN ?= runs/synthetic
REPO ?= model_repository
SEED ?= 0
# A Python with transformers4rec 23.12 (see ../shared/bench/t4rec_reference.py) to time the reference side by side
REFERENCE_PYTHON ?=

.PHONY: setup demo test test-fast lint bench-data bench-train bench-serving bench-quality soak clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m clients.demo --data $(DATA) --run $(RUN) --repo $(REPO) --seed $(SEED)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not triton"

lint: setup
	.venv/bin/ruff check training export clients tests

bench-data: setup
	$(PY) -m training.bench_prepare --out bench_results/prepare.json

bench-train: setup
	$(PY) -m training.bench_train --out bench_results/train.json $(if $(REFERENCE_PYTHON),--reference-python $(REFERENCE_PYTHON))

bench-serving: setup
	$(PY) -m clients.bench_serving --out bench_results/serving

bench-quality: setup
	$(PY) -m training.bench_quality --out bench_results/quality.json

soak: setup
	$(PY) -m clients.soak --seconds 60

clean:
	rm -rf data runs bench_results
