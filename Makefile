# Two commands set everything up on a fresh machine: `make run` (the main job) and `make test`.
# A GPU machine picks its own torch build, e.g.:
#   make run TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench results clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m paci train --nproc 2

test: $(STAMP)
	$(PY) -m pytest -q -n 2  # two workers (pytest-xdist): most tests wait on processes they started

bench: $(STAMP)
	$(PY) benchmarks/sim_speed.py
	$(PY) benchmarks/runtime_synthetic.py
	$(PY) benchmarks/predict_overhead.py
	MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 $(PY) benchmarks/partition_split.py

# The paper's claims (docs/results.md). Every experiment caches its cells, so an interrupted run
# resumes; the time-to-accuracy study alone is several CPU-hours. Run on an otherwise idle machine.
results: $(STAMP)
	$(PY) experiments/tta.py
	$(PY) experiments/drift.py
	$(PY) experiments/quality.py
	$(PY) experiments/stability.py
	$(PY) experiments/throughput.py
	$(PY) experiments/memory.py
	$(PY) experiments/peer.py

clean:
	rm -rf $(VENV) runs .pytest_cache
