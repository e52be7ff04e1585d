# The two commands a newcomer needs. Each creates or reuses ./.venv first.
PY := .venv/bin/python
.PHONY: demo demo-agent test lint test-slow setup bench clean

setup:
	@bash scripts/setup_venv.sh

# The job's model actors may each use every core: a step's phases run one after another.
demo: export RAYLHF_CPU_THREADS ?= $(shell nproc)
demo: setup   # the main job: RLVR on SmolLM2-135M-Instruct, held-out accuracy before and after
	$(PY) -m recipes.rlvr $(ARGS)

# The agent demo: a calculator tool over turns (SFT warm start on tool transcripts, then GRPO on
# episodes), held-out accuracy and tool-call rate before and after. Same thread rule as the main job.
demo-agent: export RAYLHF_CPU_THREADS ?= $(shell nproc)
demo-agent: setup
	$(PY) -m recipes.sft --config recipes/configs/sft_calculator.yaml
	$(PY) -m recipes.agent $(ARGS)

# Lint and format (ruff), then types (mypy --strict over rlhf/, settings in pyproject.toml) first:
# under a minute, and the habits every change is held to (CONTRIBUTING.md).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

test: lint
	$(PY) -m pytest -q $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

# The benchmark suite: one table (see docs/benchmarks.md). ARGS=--quick: the tiny model only.
bench: setup
	$(PY) -m bench $(ARGS)

clean:
	rm -rf .venv
