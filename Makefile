# vlmsae — two commands on a fresh machine: `make demo` (build the book) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHAPTERS := book/chapters

.PHONY: install fixture sweep notebooks book demo test lab clean

# Create or refresh the virtual environment whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,book]'
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

lab: install
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf book/_build $(CHAPTERS) outputs results
