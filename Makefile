# landscape_widget developer commands (GNU make). `make help` lists the targets.
#
# Installation note: torch and torchvision are pinned to torch==2.14.1 / torchvision==0.29.1.
# On the project's machines these (CUDA) builds are the only pair whose torchvision imports
# cleanly (the CPU-only torch 2.13.0 wheel there breaks PyPI's torchvision with "operator
# torchvision::nms does not exist"), and pip on Python 3.11 installs them from local disk
# instead of downloading several GB. They run on the CPU too. See README.md.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
NOTEBOOKS := notebooks
# Tests, notebooks (nbval, lax mode) and the docstring examples of the package; each file is
# collected once (test files hold no doctests, and the package holds no test_*.py files).
PYTEST_ARGS := tests $(NOTEBOOKS) landscape_widget --doctest-modules --nbval-lax --nbval-current-env \
	--nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-cell-timeout=900

.DEFAULT_GOAL := help
.PHONY: help venv browser-deps lab test pytest test-browser notebooks demo docs-image bench lint clean distclean

help:  ## List the targets.
	@grep -E '^[a-z][a-zA-Z_-]*:.*## ' $(MAKEFILE_LIST) | \
		awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

venv: $(STAMP)  ## Create .venv and install the package with its dev extras (once).

# The stamp is remade only when pyproject.toml changes, so repeated runs are instant.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install $(TORCH_PINS)
	$(BIN)/python -m pip install -e '.[dev]'
	@touch $@

# JupyterLab refuses to run as root without --allow-root (a container, a cloud VM), and on a
# machine with no display there is no browser to open: it then prints the URL to open
# (with its token). Extra options through LAB_ARGS, e.g. make lab LAB_ARGS="--ip=0.0.0.0".
LAB_ARGS ?=
lab: venv  ## Serve the quickstart notebook in JupyterLab (prints the URL to open).
	@args=(); \
	if [[ $$(id -u) -eq 0 ]]; then args+=(--allow-root); fi; \
	if [[ $$(uname -s) == Linux && -z "$${DISPLAY:-}$${WAYLAND_DISPLAY:-}" ]]; then \
		args+=(--no-browser); \
		echo "== no display here: open the URL printed below (http://localhost:PORT/lab?token=...) in a browser"; \
		echo "   (on a remote machine: ssh -L 8888:localhost:8888, or make lab LAB_ARGS=--ip=0.0.0.0)"; \
	fi; \
	set -x; exec $(BIN)/jupyter lab "$${args[@]}" $(LAB_ARGS) $(NOTEBOOKS)/01_quickstart.ipynb

# Chromium (apt-get, as root or with passwordless sudo) and axe-core (npm) for the browser
# tests; where they cannot be installed the test summary says the browser tests did not run.
browser-deps:  ## Install what the browser tests need, where this machine allows it.
	@bash .ci/browser-deps

test: venv browser-deps  ## Lint, then run the tests, the notebooks (nbval, lax) and the doctests.
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

pytest: venv browser-deps  ## The tests, notebooks and doctests of `make test`, without the lint step.
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-browser: venv browser-deps  ## Only the real-browser tests (JupyterLab, Notebook 7), with timings.
	$(BIN)/python -m pytest tests/test_browser.py -s

notebooks: venv  ## Re-execute the notebooks, keeping only the outputs nbval checks.
	$(BIN)/python $(NOTEBOOKS)/_refresh.py

demo: venv  ## Compute the demo surface headless and write a self-contained demo.html.
	$(BIN)/python -m landscape_widget --out demo.html

docs-image: venv  ## Regenerate docs/surface.png (the picture in the README).
	@mkdir -p docs
	$(BIN)/python -m landscape_widget --out demo.html --png docs/surface.png

$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install -e '.[bench]'
	@touch $@

bench: $(BENCH_STAMP)  ## Install the peer libraries and run the benchmarks.
	$(BIN)/python benchmarks/run.py --json benchmarks/results/latest.json
	$(BIN)/python benchmarks/mpo.py --json benchmarks/results/mpo.json
	$(BIN)/python benchmarks/hessian.py --dense --json benchmarks/results/hessian.json
	$(BIN)/python benchmarks/executor.py --json benchmarks/results/executor.json

lint: venv  ## ruff check.
	$(BIN)/ruff check .

clean:  ## Remove build outputs and caches (keeps .venv).
	rm -rf demo.html build dist .pytest_cache .ruff_cache *.egg-info
	find . -path ./$(VENV) -prune -o -type d \( -name __pycache__ -o -name .ipynb_checkpoints \) \
		-exec rm -rf {} +

distclean: clean  ## Also remove .venv.
	rm -rf $(VENV)
