"""Kernel micro-benchmarks: CPU linears and attention, Triton kernels and decode throughput on a GPU."""
