# Two commands for a fresh machine:
#   make repro   install (virtual environment + pinned requirements) and run the whole pipeline
#   make test    install and run the tests
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install repro test bench

$(VENV)/.installed: requirements.txt pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements.txt -e .
	touch $@

install: $(VENV)/.installed

repro: install
	dvc repro

test: install
	pytest

bench: install
	python benchmarks/bench.py data/processed/iclevr.pt data/raw
