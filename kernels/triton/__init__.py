"""Triton kernels: paged decode attention (split-KV), extend attention over the paged cache, the KV-cache write."""
