# Two commands do all the set-up on a fresh machine: `make repro` (the pipeline) and `make test-all` (the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Every stage is a new Python process that imports torch: 9 s when its modules are compiled anew, 4 s from cached
# bytecode. So Python writes its bytecode caches (__pycache__/, ignored by git and by .dvcignore) even where the
# environment says not to (PYTHONDONTWRITEBYTECODE, set on some CI machines).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: repro results crossval test test-all params benchmarks clean-venv

# uv installs the requirements (6 GB unpacked: torch's CUDA build) in 25 s where pip takes 45; pip remains the
# fallback where uv cannot reach the index (uv does not read pip.conf). Neither compiles the modules to bytecode
# (they compile when first imported: 20 s less).
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	($(BIN)/pip install --quiet uv==0.13.9 && $(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.txt) \
		|| $(BIN)/pip install --quiet --no-compile -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	$(BIN)/python -m etesvs.plots  # .dvc/plots_page.html: `dvc plots show` draws offline
	touch $(STAMP)

# The whole pipeline on the embedded demo dataset (or the dataset params.yaml names): `dvc repro`, stage by stage,
# with stages side by side where they leave cores idle (etesvs/repro.py; the outputs are those of `dvc repro`).
repro: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m etesvs.repro

# The models side by side and the experiments with only the columns that matter.
results: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m etesvs.results

# Every split of the dataset and experiment params.yaml names (add Hydra overrides with CV="dataset=gtea ..."), as
# queued DVC experiments; then reports/crossval.md and reports/crossval.json.
crossval: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m etesvs.crossval run $(CV)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m etesvs.crossval report $(CV)

# The fast tier of the tests (a few minutes): everything but the end-to-end tests marked slow.
test: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -m "not slow" tests

# Every test, including an end-to-end `dvc repro` on a tiny generated dataset (what CI runs).
test-all: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q tests

# params.yaml from conf/ (after editing conf/), as `dvc exp run` composes it.
params: $(STAMP)
	$(BIN)/python -m etesvs.params

benchmarks: $(STAMP)
	for script in $(wildcard benchmarks/*.py); do PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python $$script || exit 1; done

clean-venv:
	rm -rf $(VENV)
