"""Packaging for glmserve.

The top-level folders install under one import namespace: ``glmserve.engine`` is ``engine/``, ``glmserve.kernels``
is ``kernels/``, ``glmserve.proto`` is ``proto/``, ``glmserve.bench`` is ``bench/``. Those folders (and ``glmserve``
itself) are PEP 420 namespace packages, with no ``__init__.py``: a Python started in the repo root has the root on
``sys.path`` (``python -m pytest``, ``python -c``), and a folder there with an ``__init__.py`` would shadow an
installed distribution of the same bare name (HF's ``kernels``, which transformers imports, or proto-plus's
``proto``). A namespace portion never wins over a regular package, so the installed one is found first. Only their
subfolders (``engine/core``, ``kernels/triton``, ...) are regular packages.
"""
from setuptools import find_namespace_packages, setup

TOP_LEVEL = {"glmserve.engine": "engine", "glmserve.kernels": "kernels", "glmserve.proto": "proto",
             "glmserve.bench": "bench"}
PACKAGE_DIRS = dict(TOP_LEVEL)
for name, folder in TOP_LEVEL.items():
    for sub in find_namespace_packages(where=folder, exclude=["*__pycache__*", "*.egg-info*"]):
        if sub.split(".")[0] in ("data", "results", "assets", "csrc"):
            continue   # folders of data files, shipped as package data below
        PACKAGE_DIRS[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"

# The committed stubs (proto/generate.py, grpcio-tools 1.85.1) check these runtime versions at import.
GRPC = [
    "grpcio>=1.85.1",
    "grpcio-health-checking>=1.85.1",
    "grpcio-reflection>=1.85.1",
    "protobuf>=7.35.1",
    "prometheus_client>=0.19",
]
# The OpenAI-compatible HTTP API: FastAPI (request models, routing) on uvicorn, run on the gRPC server's event loop;
# httptools is uvicorn's fast HTTP/1.1 parser (without it uvicorn falls back to the pure-Python h11).
HTTP = [
    "fastapi>=0.115",
    "uvicorn>=0.30",      # Server.capture_signals, which the listener overrides to keep SIGTERM for the drain
    "httptools>=0.6",
]

setup(
    name="glmserve",
    version="0.1.0",
    description="A batched serving engine for ChatGLM3 (continuous batching, paged KV cache, Triton kernels, gRPC and "
                "an OpenAI-compatible HTTP API)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"glmserve.engine.text": ["assets/*"], "glmserve.proto": ["*.proto"],
                  "glmserve.bench": ["*.sh"], "glmserve.bench.serve": ["data/*"],
                  "glmserve.kernels.cpu": ["csrc/*.c", "csrc/*.h"]},   # compiled on first use (kernels/cpu/native.py)
    install_requires=[
        "torch>=2.5,<3",   # scaled_dot_product_attention(enable_gqa=...)
        # No triton: the CPU never runs it, and CUDA builds of torch bring the triton they were built with.
        "sentencepiece>=0.1.99",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
        # Structured outputs (engine/structured). xgrammar's own requirements are unpinned: torch>=1.10 (held by
        # our torch bound above; install the CPU or CUDA build first, as the Makefile and Dockerfile do),
        # transformers, which it imports at import time (the floor below is the test extra's), and on Linux x86_64
        # triton, which only its GPU kernel uses: a CPU install gets triton through xgrammar.
        "xgrammar>=0.2.9",
        "transformers>=4.46",
    ] + GRPC + HTTP,
    extras_require={
        "test": [
            "import-linter>=2.1",
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "triton>=3.0",   # the Triton kernel tests run in its interpreter on the CPU
            "transformers>=4.46",
            "peft>=0.13",   # the independent reference of the LoRA tests (PeftModel)
            "grpcio-tools==1.85.1",
            "kubernetes-validate>=1.28",
            "pyyaml>=6",
            "jsonschema>=4.17",   # structured-output tests validate every constrained output with it
            "openai>=1.40",       # the HTTP API's tests use the official client
        ],
        # aiohttp: the load harness's and the frontend benchmark's HTTP client (see bench/serve/openai_backend.py)
        "bench": ["matplotlib>=3.7", "transformers>=4.46", "aiohttp>=3.9"],
    },
    entry_points={
        "console_scripts": [
            "glmserve=glmserve.engine.entrypoints.cli.main:main",
            "glmserve-bench=glmserve.bench.cli:main",
        ]
    },
)
