"""Pure-torch references of every kernel: what the kernels are tested against, and what runs where no kernel does."""
