# The two commands a newcomer needs: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo

.PHONY: demo test test-fast bench lint clean

# Reinstall only when pyproject.toml changes: the stamp is newer than it otherwise.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/smpp pipeline --config jobs/configs/demo.yaml --out $(DEMO_OUT)

# The report test renders the HTML in headless Chromium (Debian package `chromium`); installed here
# when running as root with apt-get, otherwise that test skips and says why.
$(VENV)/.chromium: | $(STAMP)
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }; } || \
		echo "chromium not installed: the report's browser test will skip"
	touch $@

test: $(STAMP) $(VENV)/.chromium
	$(BIN)/python -m pytest -q --durations=15 tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" tests

bench: $(STAMP)
	$(BIN)/python bench/run_all.py --out bench/results.md

lint: $(STAMP)
	$(BIN)/ruff check smpp_ray jobs tests bench

clean:
	rm -rf runs .pytest_cache
