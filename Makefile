# The two commands of the README:  `make course` (main job)  and  `make test` (whole test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?= out

.PHONY: setup test course bench browser-test
setup:
	bash scripts/setup.sh

test: setup
	$(PY) -m pytest -q

course: setup
	$(VENV)/bin/mirlab course --out $(OUT)

bench: setup
	$(PY) benchmarks/bench_frechet.py

browser-test: setup
	MIRLAB_BROWSER_TESTS=1 $(PY) -m pytest -q -m browser
