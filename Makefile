# Two commands matter: `make demo` and `make test`. Both create .venv when missing and install
# the project into it. On CPU machines torch is pinned by constraints-cpu.txt so pip never pulls
# CUDA wheels; GPU users: install your torch into .venv first, then run with CONSTRAINTS= (empty).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONSTRAINTS ?= constraints-cpu.txt
PIP_CONSTRAINT_FLAG := $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
ARGS ?=

.PHONY: install demo search-demo search-code-demo code-demo rzero-demo rlt-demo test test-slow bench clean

$(VENV)/.installed-$(CONSTRAINTS): pyproject.toml $(CONSTRAINTS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PIP_CONSTRAINT_FLAG) -e '.[test]'
	@touch $@

install: $(VENV)/.installed-$(CONSTRAINTS)
	@sh scripts/setup_browser.sh

demo: install
	$(PY) -m policyflow train --config configs/demo.yaml run.overwrite=true $(ARGS)

search-demo: install
	$(PY) -m policyflow train --config configs/search.yaml run.overwrite=true $(ARGS)

search-code-demo: install
	$(PY) -m policyflow train --config configs/search_code.yaml run.overwrite=true $(ARGS)

code-demo: install
	$(PY) -m policyflow train --config configs/code.yaml run.overwrite=true $(ARGS)

rzero-demo: install
	$(PY) -m policyflow train --config configs/rzero.yaml run.overwrite=true $(ARGS)

rlt-demo: install
	$(PY) -m policyflow train --config configs/rlt.yaml run.overwrite=true $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

test-slow: install
	$(PY) -m pytest -q -m slow $(ARGS)

bench: install
	$(PY) benchmarks/sampler_throughput.py
	$(PY) benchmarks/rl_iteration.py
	$(PY) benchmarks/sandbox.py

clean:
	rm -rf $(VENV) runs .pytest_cache
