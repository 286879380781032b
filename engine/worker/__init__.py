"""Runs the model on a scheduled batch: flat batch tensors, the forward pass, sampling, CUDA graphs."""
