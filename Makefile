# Two commands for a new machine: `make demo` (set-up + the main job) and `make test` (set-up + all tests).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lorakit-installed

.PHONY: setup assets demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) assets

assets: $(STAMP)
	$(PY) -m lorakit.assets fetch

demo: setup
	$(VENV)/bin/lorakit train --overwrite

test: setup
	$(PY) -m pytest -q

bench: setup
	for b in bench/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
