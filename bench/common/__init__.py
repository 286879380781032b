"""What the benchmarks share: machine description, length ranges, timing helpers, the HF reference model."""
