# The two commands of the README:  `make course` (main job)  and  `make test` (whole test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: setup test quick lint-imports course bench browser-test notebooks
setup:
	bash scripts/setup.sh

# Everything: the tests (slow ones included) and every notebook under nbval (tests/conftest.py turns nbval on).
test: setup
	$(PY) -m pytest -q

# The fast tests only: no `slow` test (embedded model, notebooks run by papermill, benchmarks), no browser test,
# no nbval. A minute or two on 2 cores.
quick: setup
	$(PY) -m pytest -q -m "not slow and not browser" -p no:nbval

# The import rules of docs/architecture.md (also checked by tests/test_architecture.py).
lint-imports: setup
	$(VENV)/bin/lint-imports --no-cache

course: setup
	$(VENV)/bin/mirlab course --out $(OUT)

bench: setup
	$(PY) benchmarks/bench_frechet.py

# Browser test (opt-in; `make test` skips it): `make browser-test` runs scripts/browser_setup.sh, which installs
# the Debian package `chromium` with apt-get if no `chromium` is on PATH and Playwright for Python into the venv
# (Playwright drives that system Chromium; no browser is downloaded), then runs tests/test_browser.py with
# MIRLAB_BROWSER_TESTS=1. The test starts a headless `jupyter lab` on a free localhost port (token, temporary root
# and Jupyter dirs) serving a copy of notebooks/05_layer_explorer.ipynb, opens it in headless Chromium, runs all
# cells from the Run menu, moves the layer slider with the keyboard (ArrowRight) and the mouse (drag to the
# start), and checks each time that the readout shows the new layer, that the kernel re-rendered that layer, and
# that the page displays exactly the kernel's new PNG. Screenshots (page and explorer, before and after each
# move) go to $MIRLAB_BROWSER_SCREENSHOTS (default $(OUT)/browser/). About 2 minutes on 2 cores once the
# embedded model is cached.
browser-test: setup
	bash scripts/browser_setup.sh
	MIRLAB_BROWSER_TESTS=1 MIRLAB_BROWSER_SCREENSHOTS="$${MIRLAB_BROWSER_SCREENSHOTS:-$(OUT)/browser}" \
		$(PY) -m pytest -q -m browser tests/test_browser.py

# Re-execute the committed notebooks in place (their outputs are what nbval compares against in `make test`).
# Run after a change that alters what a notebook prints or draws; commit the result.
notebooks: setup
	for nb in notebooks/[0-9][0-9]_*.ipynb; do \
		echo "executing $$nb"; \
		$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 --ExecutePreprocessor.record_timing=False \
			--ExecutePreprocessor.kernel_name=python3 "$$nb" || exit 1; \
	done
