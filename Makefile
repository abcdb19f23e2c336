# Two commands on a fresh machine: `make demo` (the main job on the embedded PostgreSQL) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export GX_ANALYTICS_ENABLED := false

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

.PHONY: install demo test bench ui
install: $(BIN)/.installed

demo: install
	$(BIN)/credits demo

test: install
	$(BIN)/pytest -q

bench: install
	$(BIN)/python -m benchmarks.ledger_throughput
	$(BIN)/python -m benchmarks.lots_throughput
	$(BIN)/python -m benchmarks.audit_scale

ui: install
	mkdir -p .data/dagster
	test -f .data/dagster/dagster.yaml || cp pipelines/dagster.yaml .data/dagster/dagster.yaml
	DAGSTER_HOME=$(CURDIR)/.data/dagster $(BIN)/dagster dev -w workspace.yaml
