# Two entry points (see README): `make demo` runs the main job on the built-in synthetic
# dataset, `make test` runs the test suite. Both create the environment in .venv/ first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch on a machine without CUDA; set TORCH= to keep an installed build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell $(PYTHON) -c "import hashlib,sys;print(hashlib.sha1(open('pyproject.toml','rb').read()).hexdigest()[:12])")
DEMO := demo

.PHONY: demo test env

env: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(if $(TORCH),$(PY) -m pip install --disable-pip-version-check -q "$(TORCH)")
	$(PY) -m pip install --disable-pip-version-check -q -e ".[test]"
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	rm -rf $(DEMO)/sysu-mm01
	$(PY) -m shards.synthetic --layout sysu-mm01 --out $(DEMO)/sysu-mm01
	$(PY) -m shards build --layout sysu-mm01 --root $(DEMO)/sysu-mm01 --out $(DEMO)/shards --overwrite
	$(PY) -m shards verify $(DEMO)/shards
	$(PY) -m shards inspect $(DEMO)/shards --sheet $(DEMO)/contact-sheet.png

test: $(STAMP)
	$(PY) -m pytest -q
