# The two commands a newcomer needs. Each creates or reuses ./.venv first.
PY := .venv/bin/python
.PHONY: demo test test-slow setup bench clean

setup:
	@bash scripts/setup_venv.sh

demo: setup
	$(PY) -m recipes.demo $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(ARGS)

clean:
	rm -rf .venv
