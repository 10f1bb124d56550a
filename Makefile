# vlmsae — two commands on a fresh machine: `make demo` (build the book) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHAPTERS := book/chapters

.PHONY: install fixture sweep notebooks book demo test test-gpu rehearsal lab clean

# Create or refresh the virtual environment whenever pyproject.toml or constraints.txt changes.
# pyproject.toml declares compatible ranges; constraints.txt pins the exact set installed here.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip -c constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt --build-constraint constraints.txt -e '.[test,book]'
	touch $(STAMP)

install: $(STAMP)

fixture: install
	$(PY) -m vlmsae_utils.fixtures
	$(PY) -m vlmsae_utils.fixture_training

sweep: fixture
	$(PY) -m vlmsae_utils.run --config configs/fixture.yaml

notebooks: sweep
	$(PY) -m vlmsae_utils.run --all --out $(CHAPTERS)

book: install
	$(PY) -m vlmsae_utils.book

demo: notebooks
	$(PY) -m vlmsae_utils.book
	@echo "book: book/_build/html/index.html"

test: install
	$(PY) -m pytest

# CUDA against CPU (extraction, training step, bf16 autocast, MS, top-k, steering); skipped without CUDA.
test-gpu: install
	$(PY) -m pytest -m gpu -rs

# Every chapter at the paper's widths on rehearsal models (random weights, no download), measured.
rehearsal: install
	$(PY) -m vlmsae_utils.rehearsal --device $(or $(DEVICE),auto)

lab: install
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf book/_build $(CHAPTERS) outputs results
