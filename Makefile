# cfg-lab: `make repro` runs the whole study on the embedded default, `make test` the fast tests.
# Both create .venv on first use and reuse it afterwards (re-installed when pyproject.toml changes).

VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch + torchvision to install when the environment has none (these two lie on the CI disk); elsewhere e.g.
# `make TORCH='torch --index-url https://download.pytorch.org/whl/cu128' test`
TORCH ?= torch==2.14.1 torchvision==0.29.1
PORT  ?= 5000

.PHONY: env repro test test-slow lint ui sync bench preset notebook screenshot

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# the whole pipeline on params.yaml (digits, CPU or GPU), then the trade-off table
repro: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro
	@cat results/report.md 2>/dev/null | sed -n '1,40p' || true

test: $(STAMP)
	$(PY) -m pytest -q

# end-to-end tests: real `dvc repro` in a temporary clone, MLflow server, PostgreSQL-backed Optuna workers
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(VENV)/bin/ruff check cfg pipelines analysis tests benchmarks scripts
	$(VENV)/bin/ruff format --check cfg pipelines analysis tests benchmarks scripts

# the MLflow UI on localhost against the project's store (MLFLOW_TRACKING_URI, else tracking_uri in the untracked
# .cfg-lab.local.yaml, else mlflow.db); the URI is printed with its password masked
ui: $(STAMP)
	$(PY) -m cfg.study.tracking ui --port $(PORT)

# replay the MLflow logging that stages queued in .mlflow-queue/ while the store failed; end runs of killed stages
sync: $(STAMP)
	$(PY) -m cfg.study.tracking sync

bench: $(STAMP)
	$(PY) benchmarks/bench_throughput.py

# apply a preset through DVC experiments, e.g. `make preset PRESET=presets/fashion_mnist_gpu.yaml`
PRESET ?= presets/fashion_mnist_gpu.yaml
preset: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" python -m cfg.study.presets $(PRESET) --run

# Optuna search over params.yaml's search.space (not a DVC stage). `make search` makes the inputs and runs one
# worker; on more machines `PGPASSWORD=... make search-worker STORAGE=postgresql://user@host/db` (same params.yaml, the
# same inputs via `dvc pull`) joins the study. Then `make search-apply` reproduces the best trial with DVC.
SEARCH_OUT ?= results/search
SEARCH_ARGS = --data data/prepared.pt --classifier models/classifier.pt --reference data/reference.pt \
	--out-dir $(SEARCH_OUT) $(if $(STORAGE),--storage $(STORAGE))
DASHBOARD_PORT ?= 8080
.PHONY: search search-worker search-apply dashboard

search: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" dvc repro prepare classifier reference
	$(MAKE) search-worker

# GPUS=0,1: one worker per GPU, each pinned by CUDA_VISIBLE_DEVICES; WORKERS=N: N per GPU, or N CPU workers
search-worker: $(STAMP)
	$(PY) pipelines/search.py run $(SEARCH_ARGS) $(if $(GPUS),--gpus $(GPUS)) $(if $(WORKERS),--workers $(WORKERS))

search-apply: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" python pipelines/search.py apply $(SEARCH_OUT)/best_params.yaml --run

# optuna-dashboard on the study's storage (pip install -e '.[dashboard]')
dashboard: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" python pipelines/search.py dashboard --port $(DASHBOARD_PORT) \
		$(if $(STORAGE),--storage $(STORAGE))

# the trade-off notebook, run headless on this project's store, outputs saved in place
notebook: $(STAMP)
	$(PY) -m analysis.notebook

# docs/mlflow_compare.png: the MLflow compare view of the workspace's cell runs (needs chromium)
screenshot: $(STAMP)
	$(PY) scripts/screenshot_mlflow.py
