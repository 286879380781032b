"""Tensor parallelism: worker ranks in their own processes, the process group and the step broadcast."""
