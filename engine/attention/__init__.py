"""Paged attention for one layer: the batch metadata and the backends (torch reference, native CPU, Triton)."""
