# cfg-lab: `make repro` runs the whole study on the embedded default, `make test` the fast tests.
# Both create .venv on first use and reuse it afterwards (re-installed when pyproject.toml changes).

VENV  ?= .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# torch + torchvision to install when the environment has none (these two lie on the CI disk); elsewhere e.g.
# `make TORCH='torch --index-url https://download.pytorch.org/whl/cu128' test`
TORCH ?= torch==2.14.1 torchvision==0.29.1
PORT  ?= 5000
# the daily verbs: each target below is a thin call of `cfg-lab VERB` (cfg/cli.py), which finds dvc, python and
# jupyter in this venv whether it is activated or not. Overrides: `make repro SET='sample.steps=16 train.lr=1e-3'`
CFG_LAB := $(VENV)/bin/cfg-lab
SET_FLAGS = $(foreach kv,$(SET),-S $(kv))

.PHONY: env repro test test-slow lint ui sync bench preset notebook lab compare plots exp-show screenshot

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# the whole pipeline on params.yaml (digits, CPU or GPU), then the trade-off table; SET='k=v ...' makes it a
# `dvc exp run -S k=v ...` in the workspace
repro: $(STAMP)
	$(CFG_LAB) repro $(SET_FLAGS)
	@cat results/report.md 2>/dev/null | sed -n '1,40p' || true

# did this checkout's results/ reproduce the committed run? (REF: a git revision or folder, default HEAD)
REF ?= HEAD
compare: $(STAMP)
	$(CFG_LAB) compare $(REF)

# `dvc exp show` with the columns worth reading (cfg-lab exp show --all: every column)
exp-show: $(STAMP)
	$(CFG_LAB) exp show

# `dvc plots show` into dvc_plots/index.html, readable offline (the vega scripts are fetched once, inlined)
plots: $(STAMP)
	$(CFG_LAB) plots

test: $(STAMP)
	$(PY) -m pytest -q

# end-to-end tests: real `dvc repro` in a temporary clone, MLflow server, PostgreSQL-backed Optuna workers
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow --durations=15

lint: $(STAMP)
	$(VENV)/bin/ruff check cfg pipelines analysis tests benchmarks scripts
	$(VENV)/bin/ruff format --check cfg pipelines analysis tests benchmarks scripts

# the MLflow UI on localhost against the project's store (MLFLOW_TRACKING_URI, else tracking_uri in the untracked
# .cfg-lab.local.yaml, else mlflow.db; printed with its password masked): one worker, no job runner. It prints
# links into the latest study (STUDY=<DVC experiment> for another): its cells' runs table and its charts
ui: $(STAMP)
	$(CFG_LAB) ui --port $(PORT) $(if $(STUDY),--study '$(STUDY)')

# replay the MLflow logging that stages queued in .mlflow-queue/ while the store failed; end runs of killed stages
sync: $(STAMP)
	$(CFG_LAB) sync

bench: $(STAMP)
	$(CFG_LAB) bench

# apply a preset through DVC experiments, e.g. `make preset PRESET=presets/fashion_mnist_gpu.yaml`
PRESET ?= presets/fashion_mnist_gpu.yaml
preset: $(STAMP)
	$(CFG_LAB) exp run --preset $(PRESET) $(SET_FLAGS)

# Optuna search over params.yaml's search.space (not a DVC stage). `make search` makes the inputs and runs one
# worker; on more machines `PGPASSWORD=... make search-worker STORAGE=postgresql://user@host/db` (same params.yaml, the
# same inputs via `dvc pull`) joins the study. Then `make search-apply` reproduces the best trial with DVC.
SEARCH_OUT ?= results/search
SEARCH_ARGS = --data data/prepared.pt --classifier models/classifier.pt --reference data/reference.pt \
	--out-dir $(SEARCH_OUT) $(if $(STORAGE),--storage $(STORAGE))
DASHBOARD_PORT ?= 8080
.PHONY: search search-worker search-apply dashboard

# overrides: `make search N_TRIALS=5 SET='train.steps=200'` (every worker of a study needs the same SET)
SEARCH_OVERRIDES = $(if $(N_TRIALS),--n-trials $(N_TRIALS)) $(SET_FLAGS)
search: $(STAMP)
	$(CFG_LAB) search --out-dir $(SEARCH_OUT) $(if $(STORAGE),--storage $(STORAGE)) \
		$(if $(GPUS),--gpus $(GPUS)) $(if $(WORKERS),--workers $(WORKERS)) $(SEARCH_OVERRIDES)

# GPUS=0,1: one worker per GPU, each pinned by CUDA_VISIBLE_DEVICES; WORKERS=N: N per GPU, or N CPU workers
search-worker: $(STAMP)
	$(PY) pipelines/search.py run $(SEARCH_ARGS) $(if $(GPUS),--gpus $(GPUS)) $(if $(WORKERS),--workers $(WORKERS)) \
		$(SEARCH_OVERRIDES)

search-apply: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" python pipelines/search.py apply $(SEARCH_OUT)/best_params.yaml --run

# optuna-dashboard on the study's storage (pip install -e '.[dashboard]')
dashboard: $(STAMP)
	PATH="$(abspath $(VENV))/bin:$$PATH" python pipelines/search.py dashboard --port $(DASHBOARD_PORT) \
		$(if $(STORAGE),--storage $(STORAGE))

# the trade-off notebook, run headless on this project's store; the executed copy goes to results/notebook/
notebook: $(STAMP)
	$(CFG_LAB) notebook

# JupyterLab on analysis/tradeoff.ipynb with this venv's kernel (installs the notebook extra once)
lab: $(STAMP)
	$(PY) -c "import jupyterlab" 2>/dev/null || $(PY) -m pip install -q -e '.[notebook]'
	$(CFG_LAB) lab

# docs/mlflow_compare.png: the MLflow charts view of the workspace's study (the link `make ui` prints; needs chromium)
screenshot: $(STAMP)
	$(PY) scripts/screenshot_mlflow.py
