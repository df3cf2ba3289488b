# The two commands of the README. Each creates or reuses .venv by itself.
PY := .venv/bin/python

.PHONY: env test demo lint
env:
	bash scripts/setup_env.sh

test: env
	$(PY) -m pytest

demo: env
	bash scripts/demo.sh

lint: env
	.venv/bin/ruff check soft_beam fairseq_plugins scripts tests
	.venv/bin/ruff format --check soft_beam fairseq_plugins scripts tests
