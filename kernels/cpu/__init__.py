"""The native CPU kernels (``csrc/*.c``, built on first use and loaded with ctypes): decode attention, KV write, fused
norm/rotary/SwiGLU."""
