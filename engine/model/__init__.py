"""The ChatGLM3 model and its weights: layers, checkpoint loading, quantized weights, test checkpoints."""
