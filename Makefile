# Two commands matter (see README.md): `make demo` runs the main job on the built-in default,
# `make test` runs the test suite. Both bootstrap a virtual environment in .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch, installed first when .venv has none: pip picks the build for the platform (on Linux x86-64 that is
# the CUDA build, several GB). On a machine without a GPU the CPU build is much smaller:
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
# TORCH is pip arguments, split into words by the shell: quote a version range inside it ("'torch>=2.4'").
TORCH ?= torch==2.13.0

.PHONY: install demo test lint bench-solver bench-probes bench-placement zoo clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/allocate --data builtin-facts -o out/demo --overwrite

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
