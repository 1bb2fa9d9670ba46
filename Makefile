# `make demo` and `make test` are the whole set-up on a fresh clone: each installs first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CORE   := .venv-core
TORCH  := torch==2.13.0

.PHONY: install test test-fast test-core lint demo demo-full bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]"
	$(PY) -m pip install -q --no-deps sporco==0.2.2.post1   # only its bundled photos are used
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)   # everything but the tests marked slow
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The library alone (no editing / serve extras), in its own virtualenv: the CLI, the toy, the core's tests.
$(CORE)/.installed: pyproject.toml
	python3 -m venv $(CORE)
	$(CORE)/bin/python -m pip install -q "$(TORCH)" -e ".[test-core]"
	touch $@

test-core: $(CORE)/.installed
	$(CORE)/bin/funcmem --help > /dev/null
	$(CORE)/bin/funcmem toy --steps 20 --out runs/toy-core
	$(CORE)/bin/python -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/funcmem demo --quick

demo-full: $(STAMP)
	$(VENV)/bin/funcmem demo

bench: $(STAMP)
	$(VENV)/bin/funcmem bench all

clean:
	rm -rf $(VENV) $(CORE) runs .pytest_cache .ruff_cache
