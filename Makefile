# Two entry points (see README): `make demo` runs the main job on the built-in synthetic
# dataset, `make test` runs the test suite. Both create the environment in .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch on a machine without CUDA; set TORCH= to keep an installed build.
TORCH ?= torch==2.13.0
# The DALI build (pyproject extras): dali (CUDA 12, and the CPU path) or dali-cuda13 (torch for CUDA 13).
DALI ?= dali
STAMP := $(VENV)/.installed-$(shell $(PYTHON) -c "import hashlib,sys;print(hashlib.sha1(open('pyproject.toml','rb').read()).hexdigest()[:12])")
DEMO := demo

.PHONY: demo test env gpu-check

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install --disable-pip-version-check -q "$(TORCH)")
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test,$(DALI)]"
	rm -f $(VENV)/.installed-* && touch $@

# The main job (python -m train.demo): a re-run reuses or resumes every finished stage in
# $(DEMO)/; DEMO_ARGS passes options, e.g. make demo DEMO_ARGS="--method pass".
demo: $(STAMP)
	$(PY) -m train.demo --out $(DEMO) $(DEMO_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

# The one-call GPU check (benchmarks/gpu_check.py, README "GPU check"): on a GPU machine with
# PyTorch, the carried DALI parts (.gpu-deps/) and wheels (.whl/); no virtual environment (the
# machine's python3 and its CUDA build of torch). GPU_CHECK_ARGS passes options, e.g.
# make gpu-check GPU_CHECK_ARGS="--archive $$OUT/gpu-check.tar.gz".
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)
