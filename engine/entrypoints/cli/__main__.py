"""``python -m glmserve.engine.entrypoints.cli``: the ``glmserve`` command."""
import sys

from glmserve.engine.entrypoints.cli.main import main

sys.exit(main())
