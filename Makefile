# Two commands matter (see README.md): `make demo` runs the main job on the built-in default,
# `make test` runs the test suite. Both bootstrap a virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of torch; plain `torch` would pull a multi-GB CUDA build on machines with none installed.
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench-solver bench-probes bench-placement zoo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/allocate -o out/demo --overwrite

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

zoo: install
	$(PY) -m benchmarks.zoo

bench-solver: install
	$(PY) -m benchmarks.solver_scale

bench-probes: install
	$(PY) -m benchmarks.probe_overhead

bench-placement: install
	$(PY) -m benchmarks.placement

clean:
	rm -rf $(VENV) out .pytest_cache
