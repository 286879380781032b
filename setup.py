"""Packaging for glmserve.

The top-level folders install under one import namespace (``glmserve.engine`` -> ``engine/`` and so on) so that
no bare ``kernels`` or ``proto`` module shadows a PyPI package of the same name.
"""
from setuptools import setup

PACKAGE_DIRS = {
    "glmserve": "glmserve",
    "glmserve.engine": "engine",
    "glmserve.kernels": "kernels",
    "glmserve.proto": "proto",
    "glmserve.bench": "bench",
}

# The committed stubs (proto/generate.py, grpcio-tools 1.85.1) check these runtime versions at import.
GRPC = [
    "grpcio>=1.85.1",
    "grpcio-health-checking>=1.85.1",
    "grpcio-reflection>=1.85.1",
    "protobuf>=7.35.1",
    "prometheus_client>=0.19",
]

setup(
    name="glmserve",
    version="0.1.0",
    description="A batched serving engine for ChatGLM3 (continuous batching, paged KV cache, Triton kernels, gRPC)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=list(PACKAGE_DIRS),
    package_dir=PACKAGE_DIRS,
    package_data={"glmserve.engine": ["assets/*"], "glmserve.proto": ["*.proto"], "glmserve.bench": ["*.sh", "data/*"],
                  "glmserve.kernels": ["cpu/*.c", "cpu/*.h"]},   # compiled on first use (kernels/cpu_native.py)
    install_requires=[
        "torch>=2.5,<3",   # scaled_dot_product_attention(enable_gqa=...)
        "triton>=3.0",
        "sentencepiece>=0.1.99",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ] + GRPC,
    extras_require={
        "test": [
            "pytest>=7.4",
            "pytest-timeout>=2.2",
            "transformers>=4.46",
            "grpcio-tools==1.85.1",
            "kubernetes-validate>=1.28",
            "pyyaml>=6",
        ],
        "bench": ["matplotlib>=3.7", "transformers>=4.46"],
    },
    entry_points={
        "console_scripts": [
            "glmserve=glmserve.engine.cli:main",
            "glmserve-bench=glmserve.bench.cli:main",
        ]
    },
)
