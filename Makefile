# Every target creates or refreshes .venv itself, so a fresh machine needs only python3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PYTEST_WORKERS ?= 2

.PHONY: demo test test-oldest jax-oldest lint format docs docs-check

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

# The lowest jax the pin in pyproject.toml allows, e.g. 0.10.2 for "jax>=0.10.2,<0.12".
JAX_OLDEST := $(shell sed -n 's/^ *"jax>=\([0-9.]*\),.*/\1/p' pyproject.toml)
OLDEST := .venv-oldest

jax-oldest:
	@echo $(JAX_OLDEST)

# The tests that reach JAX's internals (the kernels' primitives and their derivatives, mods,
# shard_map typing), on the lowest jax and jaxlib the pin allows, in a venv of its own.
test-oldest: pyproject.toml
	test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST)/bin/python -m pip install --quiet -e ".[test]" "jax==$(JAX_OLDEST)" "jaxlib==$(JAX_OLDEST)"
	$(OLDEST)/bin/python -m pytest -n $(PYTEST_WORKERS) tests/test_jax_compat.py \
		tests/test_derivatives.py tests/test_mods.py tests/test_sharding.py

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
