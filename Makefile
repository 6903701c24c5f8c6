# Two entry points, each doing all its own set-up:  `make study`  and  `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is pinned here (not in pyproject.toml, which accepts torch>=2.4): 2.13.0 is the CPU wheel already on disk;
# an unpinned torch would download a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: study study-quick test lint bench clean browser

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[dev,ray,bench,transformers,lightning]"
	touch $@

study: $(VENV)/.installed          ## reproduce the seed's claims on MNIST-1D -> study/report.html
	$(VENV)/bin/lrbs study --out study

study-quick: $(VENV)/.installed
	$(VENV)/bin/lrbs study --quick --out study-quick

browser:                           ## headless Chromium for the report's end-to-end test (best effort)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || \
	    echo "note: chromium could not be installed; the browser test will be skipped"; }

test: $(VENV)/.installed browser   ## lint + the whole test suite
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/pytest -q tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

bench: $(VENV)/.installed          ## speed against the peer tools (prints tables; see bench/RESULTS.md)
	$(PY) -m bench

clean:
	rm -rf $(VENV) study study-quick .pytest_cache .ruff_cache
