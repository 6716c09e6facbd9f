# cfg-lab: `make repro` runs the whole study on the embedded default, `make test` the fast tests.
# Both create .venv on first use and reuse it afterwards (re-installed when pyproject.toml changes).

VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch + torchvision to install when the environment has none (these two lie on the CI disk); elsewhere e.g.
# `make TORCH='torch --index-url https://download.pytorch.org/whl/cu128' test`
TORCH ?= torch==2.14.1 torchvision==0.29.1
PORT  ?= 5000

.PHONY: env repro test test-slow lint ui bench clean-results

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# the whole pipeline on params.yaml (digits, CPU or GPU), then the trade-off table
repro: $(STAMP)
	$(VENV)/bin/dvc repro
	@cat results/report.md 2>/dev/null | sed -n '1,40p' || true

test: $(STAMP)
	$(PY) -m pytest -q

# end-to-end tests: real `dvc repro` in a temporary clone, MLflow server, PostgreSQL-backed Optuna workers
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check cfg pipelines analysis tests benchmarks
	$(VENV)/bin/ruff format --check cfg pipelines analysis tests benchmarks

# the MLflow UI on localhost against the project's store (or MLFLOW_TRACKING_URI)
ui: $(STAMP)
	$(PY) -m cfg.tracking ui --port $(PORT)

bench: $(STAMP)
	$(PY) benchmarks/bench_sampling.py
