# `make serve` and `make test` do all the set-up on a fresh machine.
VENV      ?= .venv
PY        := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# Without an NVIDIA GPU, take torch's CPU build (PyPI's Linux wheel is the CUDA one, several GB);
# a local CPU wheel in pip's find-links wins too. With a GPU, PyPI's CUDA build.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_PIP_ARGS ?= $(if $(shell command -v nvidia-smi),,--extra-index-url $(TORCH_CPU_INDEX))
STAMP     := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install serve test test-tools check image protos manifests bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@echo "install [1/4] virtual environment in $(VENV)"
	@test -x $(PY) || python3 -m venv $(VENV)
	@echo "install [2/4] pip"
	@$(PY) -m pip install -q --upgrade pip
	@echo "install [3/4] $(TORCH_SPEC) (a few minutes the first time)"
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	@echo "install [4/4] cispo and its dependencies"
	@$(PY) -m pip install -q -e ".[dev]"
	@# tinker-cookbook 0.6.1 (for its RL loop test) declares tml-renderers>=0.4.1, which PyPI lacks and
	@# which it imports only for two model families; its other needs are in the dev extra.
	@$(PY) -m pip install -q --no-deps "tinker-cookbook==0.6.1"
	@touch $(STAMP)
	@echo "install done"

serve: install
	$(VENV)/bin/cispo-server

test-tools:
	bash scripts/install-test-tools.sh

# Lint, format and types (pyproject.toml's [tool.ruff] and [tool.mypy]); `make test` runs them first.
check: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: install test-tools check
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The server image, cispo:<version>-$(IMAGE_VARIANT), with buildah (docs/deploy.md, "Images").
IMAGE_VARIANT ?= cpu
image:
	bash scripts/build-image.sh $(IMAGE_VARIANT)

protos: install
	$(PY) protos/generate.py

manifests: install
	$(PY) deploy/k8s/monitoring/generate_prometheusrule.py

bench: install
	$(PY) bench/bench_logprob_head.py

clean:
	rm -rf $(VENV) build *.egg-info tests/node/node_modules
