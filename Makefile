# Two commands set everything up on a fresh machine:
#   make demo   - the main job: one embedding dataset in every format, read speed table, then the same
#                 training loops (ClusterLabeled and JASPER) from every backend
#   make test   - the test suite (needs PostgreSQL only for catalog tests; S3 runs on moto)
#   make docs   - the documentation site (mkdocs-material + mkdocstrings) into site/
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test bench lint docs clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# the CPU build of torch first, so nothing pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	# constraints.txt pins a tested set that passes pip check: one quick resolve instead of a long
	# backtrack through chromadb's and torch's dependency trees (regenerate: pip freeze --exclude-editable)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/unistore demo --dir demo-data

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_take.py
	$(PY) benchmarks/bench_catalog.py
	$(PY) benchmarks/bench_datasets.py
	$(PY) benchmarks/bench_experiments.py
	$(PY) benchmarks/bench_lora.py

# the documentation site into site/; --strict: a broken link or a reference to a name that no longer exists fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src

clean:
	rm -rf $(VENV) demo-data site
