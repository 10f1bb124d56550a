# vlmsae — two commands on a fresh machine: `make demo` (build the book) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CHAPTERS := book/chapters

.PHONY: install jupyter-setup fixture sweep notebooks book publish demo lint format typecheck test test-fast test-gpu bench-gpu rehearsal lab clean

# Create or refresh the virtual environment whenever pyproject.toml or constraints.txt changes.
# pyproject.toml declares compatible ranges; constraints.txt pins the exact set installed here.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip -c constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt --build-constraint constraints.txt -e '.[test,book]'
	$(MAKE) --no-print-directory jupyter-setup
	$(PY) -m compileall -q vlmsae_utils  # byte-code of the editable package, read by every process and kernel
	touch $(STAMP)

# JupyterLab in this environment opens notebooks/*.md as notebooks on a double-click (Jupytext
# Notebook as the default viewer), and a kernel named vlmsae runs this environment's Python from
# any JupyterLab (the notebooks ask for it).
LAB_SETTINGS := $(VENV)/share/jupyter/lab/settings
jupyter-setup:
	mkdir -p $(LAB_SETTINGS)
	cp configs/jupyterlab-overrides.json $(LAB_SETTINGS)/overrides.json
	$(PY) -m ipykernel install --user --name vlmsae --display-name "Python (vlmsae)" >/dev/null

install: $(STAMP)

fixture: install
	$(PY) -m vlmsae_utils.fixtures --trained

sweep: fixture
	$(PY) -m vlmsae_utils.run --config configs/fixture.yaml

# The fixture sweep and the chapters on their defaults run side by side, one torch thread each (the
# 2 cores of a laptop; as the test session trains them); chapter 6 waits for the sweep's results.
notebooks: fixture
	@export OMP_NUM_THREADS=1 VLMSAE_TRAIN_THREADS=1; \
	$(PY) -m vlmsae_utils.run --config configs/fixture.yaml & sweep=$$!; \
	$(PY) -m vlmsae_utils.run --all --out $(CHAPTERS); chapters=$$?; \
	wait $$sweep && exit $$chapters

# make book: the book of book/chapters; make book SWEEP=NAME: the book of a sweep's own runs
# (results/NAME and its executed notebooks; nothing is re-executed). make publish [SWEEP=NAME]
# also pushes the built site to the gh-pages branch (ghp-import).
book: install
	$(PY) -m vlmsae_utils.book $(if $(SWEEP),--from-sweep $(SWEEP))

publish: install
	$(PY) -m vlmsae_utils.book $(if $(SWEEP),--from-sweep $(SWEEP)) --publish

demo: notebooks
	$(PY) -m vlmsae_utils.book
	@echo "book: book/_build/html/index.html"

# ruff (configured in pyproject.toml): lint and format check, before the tests.
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# mypy (configured in pyproject.toml) over the whole package: basic mode, stricter on the SAE,
# the trainer and the metrics (pyproject's overrides).
TYPED := -p vlmsae_utils
typecheck: install
	$(VENV)/bin/mypy $(TYPED)

test: lint typecheck
	$(PY) -m pytest

# The inner loop (about a minute): every test not marked slow, so no trained fixture model and no
# notebook run. `make test` stays the full suite (the one .ci/run calls).
test-fast: install
	$(PY) -m pytest -m "not slow"

# CUDA against CPU (extraction, training step, bf16 autocast, MS, top-k, steering); skipped without CUDA.
test-gpu: install
	$(PY) -m pytest -m gpu -rs

# Every stage's speed on the card against its baseline (benchmarks/bench_gpu.py; about 8 minutes on
# an H100, each part under its own time limit), as a CSV chapter 7 shows and a printed table.
bench-gpu: install
	$(PY) benchmarks/bench_gpu.py --device $(or $(DEVICE),cuda)

# Every chapter at the paper's widths on rehearsal models (random weights, no download), measured.
rehearsal: install
	$(PY) -m vlmsae_utils.rehearsal --device $(or $(DEVICE),auto)

lab: install
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf book/_build $(CHAPTERS) outputs results
