# The two set-up commands of the README: `make demo` (the serving demo) and `make test` (the test suite).
# Both install what they need first, with the Python that is active (in a virtual environment, `python3` is its
# own); the CPU build of torch is pinned because a plain `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
TORCH_CPU ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test test-fast demo bench-offline proto gpu-check image-check

install:
	$(PYTHON) -m pip install -q "$(TORCH_CPU)"
	$(PYTHON) -m pip install -q -e ".[test,bench]"

test: install
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# Everything but subprocess servers, tensor-parallel workers and Triton interpreter kernels: under 3 minutes on 2 cores.
test-fast: install
	$(PYTHON) -m pytest -q -m "not subprocess and not tensor_parallel and not interpreter" $(PYTEST_ARGS)

demo: install
	$(PYTHON) -m glmserve.bench.demo

bench-offline: install
	$(PYTHON) -m glmserve.bench.cli offline --out results/offline.json

proto:
	$(PYTHON) proto/generate.py

# On a GPU machine that already has torch and triton (installs nothing else).
gpu-check:
	bash bench/gpu_check.sh $${OUT:-results}

# Builds deploy/Dockerfile (CPU), runs it as the Kubernetes manifests do and checks that it serves and drains.
# Needs a container builder and a runtime (see deploy/README.md); not part of `make test`.
image-check: install
	PYTHON="$(PYTHON)" TORCH_PIN="$(TORCH_CPU)" bash deploy/image_check.sh
