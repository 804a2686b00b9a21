# Every target creates or refreshes .venv itself, so a fresh machine needs only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: demo test lint format docs docs-check

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# One stamp per extra: re-installs whenever pyproject.toml changes.
$(VENV)/.stamp-%: pyproject.toml | $(PY)
	$(PY) -m pip install --quiet -e ".[$*]"
	touch $@

# Train the example character-level language model (about 3 minutes on 2 CPU cores), sample
# from it with the KV cache and write a checkpoint and plots to out/.
demo: $(VENV)/.stamp-examples
	$(PY) docs/examples/char_lm.py

test: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -n $(PYTEST_WORKERS)

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.stamp-test
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The documentation site, built into site/; --strict turns a broken reference into an error.
docs: $(VENV)/.stamp-docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# Load the built site in headless Chromium, offline, through Playwright
# (needs Debian's `chromium`: apt-get install chromium; not run by CI).
docs-check: docs $(VENV)/.stamp-docs-check
	$(PY) docs/scripts/check_site.py
