# kdpipe: `make repro` runs the pipeline, `make test` runs the tests; both set up .venv first.
# `make help` lists the targets (the `## ` comments below).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.kdpipe-installed
export PYTHONWARNINGS ?= ignore::DeprecationWarning,ignore::FutureWarning

DATA   ?=
N      ?= 3
FIRST  ?= 1
TEST_WORKERS ?= 2
JOBS   ?= 1
T      ?= 1,2,4
ALPHA  ?= 0.5,0.9
TARGET ?= evaluate
# make server: the team tracking server's database (any SQLAlchemy URI, e.g. postgresql://user:pass@host:5432/mlflow
# with psycopg2 installed) and where it keeps the artifacts it proxies (a folder, or s3://... with boto3)
SERVER_DIR ?= mlflow-server
BACKEND    ?= sqlite:///$(CURDIR)/$(SERVER_DIR)/mlflow.db
ARTIFACTS  ?= $(CURDIR)/$(SERVER_DIR)/artifacts
.PHONY: setup help repro exp exp-show compare presets replicate sweep test ui server clean-venv

setup: $(STAMP)  ## create .venv and install the pinned dependencies and kdpipe (idempotent)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[test,tfds]"
	touch $(STAMP)

help:  ## list the targets
	@awk -F ':.*## ' '/^[a-z-]+:.*## / { printf "  make %-11s %s\n", $$1, $$2 }' $(firstword $(MAKEFILE_LIST))

repro: setup  ## run the whole DVC pipeline; DATA=cifar10|cifar10-cpu|intel|cats_vs_dogs|imagefolder|csv|digits first writes that preset into params.yaml (put back if the run fails)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(if $(DATA),$(BIN)/python -m kdpipe.presets $(DATA) --run --) $(BIN)/dvc repro

exp: setup  ## a DVC experiment on DATA's preset (-S flags; params.yaml is left as it is): make exp DATA=cifar10 [ARGS="-S kd.alpha=0.5"]
	@test -n "$(DATA)" || { echo "error: name the data set, e.g. make exp DATA=cifar10 (see make presets)." >&2; exit 2; }
	flags="$$($(BIN)/python -m kdpipe.presets $(DATA) --flags)" && PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp run $$flags $(ARGS)

replicate: setup  ## N seed replicates of the committed run (only student.seed varies) through DVC's queue, then their table: make replicate N=3 [FIRST=1] [JOBS=1]
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/kdpipe replicate --seeds $(N) --first $(FIRST) --jobs $(JOBS)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/kdpipe replicate-report --out reports/replicates

sweep: setup  ## a kd.temperature x kd.alpha grid through DVC's queue on JOBS workers, each logging to MLFLOW_TRACKING_URI, then its heatmap and table: make sweep T=1,2,4 ALPHA=0.5,0.9 [JOBS=1] [TARGET=evaluate]
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/kdpipe sweep --temperatures $(T) --alphas $(ALPHA) --jobs $(JOBS) $(if $(TARGET),--target $(TARGET))
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/kdpipe sweep-report --out reports/sweep

# exp show columns that move on every run or repeat the headline (timings, intervals, deployment detail)
EXP_SHOW_DROP := best\..*|models\..*|.*\.(pytorch|ort_fp32|ort_int8)\..*|metrics/timing/.*|machine\..*|.*ci95.*|.*mcnemar.*|.*gap_closed|.*best_epoch|.*best_val_accuracy|.*accuracy_vs_teacher|.*accuracy_diff.*|Created|data/.*|metrics$$|models$$|plots.*|src/.*|stages/.*

exp-show: setup  ## dvc exp show --only-changed without timings and detail: changed params and test accuracies
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc exp show --only-changed --drop '$(EXP_SHOW_DROP)'

compare: setup  ## the HEAD run and its DVC experiments on one screen: changed params and test accuracy per model
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/kdpipe compare

presets: setup  ## list the data-set presets
	@$(BIN)/python -m kdpipe.presets --list

test: setup  ## run the test suite in TEST_WORKERS=2 parallel processes (a test file stays in one worker)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

ui: setup  ## the MLflow UI on the project's tracking store, on 127.0.0.1 only; prints the runs table's address
	@case "$${MLFLOW_TRACKING_URI:-}" in \
	  http://*|https://*) echo "MLFLOW_TRACKING_URI is a tracking server, which is its own UI: open $$MLFLOW_TRACKING_URI";; \
	  *) echo "MLflow runs table: $$($(BIN)/kdpipe ui-url --port $${PORT:-5000} 2>/dev/null || echo http://127.0.0.1:$${PORT:-5000})" && \
	     set -x && PYTHONWARNINGS="$${PYTHONWARNINGS:+$$PYTHONWARNINGS,}ignore:starlette.middleware.wsgi is deprecated" $(BIN)/mlflow ui --backend-store-uri "$${MLFLOW_TRACKING_URI:-sqlite:///$(CURDIR)/mlflow.db}" --host 127.0.0.1 --port $${PORT:-5000};; \
	esac

server: setup  ## a team MLflow tracking server on 127.0.0.1:PORT (5000): runs in SQLite under mlflow-server/ (BACKEND=postgresql://... for PostgreSQL), artifacts proxied into mlflow-server/artifacts
	@mkdir -p "$(SERVER_DIR)"
	@echo "MLflow tracking server; point the pipeline at it with: export MLFLOW_TRACKING_URI=http://127.0.0.1:$${PORT:-5000}"
	$(BIN)/mlflow server --backend-store-uri "$(BACKEND)" --artifacts-destination "$(ARTIFACTS)" --host 127.0.0.1 --port $${PORT:-5000} $(SERVER_ARGS)

clean-venv:  ## remove .venv
	rm -rf $(VENV)
