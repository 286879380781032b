"""``glmserve-bench offline``: offline throughput against HF generate on the same weights."""
