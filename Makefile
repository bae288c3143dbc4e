# The commands people run. `make test` and `make demo` create .venv and install everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install test lint bench bench-gpu bench-learning demo clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins the exact tested set; torch==2.13.0 is the CPU build on machines without a GPU.
	# editable_mode=compat puts the project on sys.path (a .pth line), so a model/, pipeline/ or jobs/ folder in the
	# directory a job runs from cannot shadow its packages (the default editable finder loses to such a folder)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --config-settings editable_mode=compat -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	$(PY) -m pytest -q

lint: $(VENV)/.installed
	$(PY) -m ruff check model pipeline jobs tests benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/model_throughput.py
	$(PY) benchmarks/preprocess_throughput.py
	$(PY) benchmarks/pipeline_throughput.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/sample_bounds.py

bench-gpu: $(VENV)/.installed
	$(PY) benchmarks/gpu.py

bench-learning: $(VENV)/.installed
	$(PY) benchmarks/demo_ranking.py
	$(PY) benchmarks/learning.py

demo: $(VENV)/.installed
	$(PY) -m jobs.demo

clean:
	rm -rf $(VENV) .pytest_cache
