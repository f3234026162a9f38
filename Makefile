# Two commands do all the set-up on a fresh machine: `make repro` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: repro test benchmarks clean-venv

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

# The whole pipeline on the embedded demo dataset (or the dataset params.yaml names).
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/dvc repro

# The test suite, including an end-to-end `dvc repro` on a tiny generated dataset.
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q tests

benchmarks: $(STAMP)
	for script in $(filter-out benchmarks/common.py,$(wildcard benchmarks/*.py)); do PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python $$script || exit 1; done

clean-venv:
	rm -rf $(VENV)
