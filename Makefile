# `make serve` and `make test` do all the set-up on a fresh machine.
VENV      ?= .venv
PY        := $(VENV)/bin/python
# CPU build by default; a CUDA machine sets TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" with a CUDA index).
TORCH_SPEC ?= torch==2.13.0
STAMP     := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve test test-tools protos bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

serve: install
	$(VENV)/bin/cispo-server

test-tools:
	bash scripts/install-test-tools.sh

test: install test-tools
	$(PY) -m pytest -q $(PYTEST_ARGS)

protos: install
	$(PY) protos/generate.py

bench: install
	$(PY) bench/bench_logprob_head.py

clean:
	rm -rf $(VENV) build *.egg-info tests/node/node_modules
