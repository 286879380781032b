"""What every ``glmserve-bench`` subcommand module does around its measurement: refuse a bad setting with one line,
print the result's table and write its JSON, and run on its own (``python -m glmserve.bench.X``)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from types import ModuleType

from glmserve.bench.common.output import write_json


def refuse(command: str, problem: str) -> int:
    """A setting the benchmark cannot run with: one line on stderr, exit status 2 (argparse's)."""
    print(f"glmserve-bench {command}: error: {problem}", file=sys.stderr)
    return 2


def report(result, out: str | None) -> int:
    """Print ``result.table()``; write the result (a dataclass) as JSON to ``out`` when given."""
    print(result.table())
    if out:
        write_json(out, asdict(result))
    return 0


def standalone_main(module: ModuleType, command: str, argv: list[str] | None) -> int:
    """The module's ``add_arguments`` and ``run``, as ``glmserve-bench COMMAND`` would call them."""
    parser = argparse.ArgumentParser(prog=f"glmserve-bench {command}", description=module.__doc__.split("\n\n")[0])
    module.add_arguments(parser)
    return module.run(parser.parse_args(argv))
