"""The ``glmserve`` command."""
