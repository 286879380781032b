"""glmserve: a serving engine for ChatGLM3. Subpackages: engine, kernels, proto, bench."""
__version__ = "0.1.0"
