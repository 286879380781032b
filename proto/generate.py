"""Generate the Python stubs of the gRPC API from ``generation.proto``.

    python proto/generate.py            # rewrite the committed stubs beside this file
    python proto/generate.py OUT_DIR    # write them elsewhere (the drift test does this)

protoc writes ``import generation_pb2`` into the service stub, which only works with ``proto/`` on sys.path. The
stubs live in the ``glmserve.proto`` package, so that import is rewritten to a relative one.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
PROTO_FILES = ("generation.proto",)


def generate(out_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on every API file; returns the files written."""
    from grpc_tools import protoc  # a build-time tool, not a runtime dependency

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # protoc needs the well-known types' include path when a file imports google/protobuf/*.
    well_known = Path(protoc.__file__).resolve().parent / "_proto"
    written: list[Path] = []
    for name in PROTO_FILES:
        args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out_dir}",
                f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", str(PROTO_DIR / name)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {name}")
        stem = Path(name).stem
        grpc_stub = out_dir / f"{stem}_pb2_grpc.py"
        text = grpc_stub.read_text(encoding="utf-8")
        text = re.sub(rf"^import {stem}_pb2 as ", f"from . import {stem}_pb2 as ", text, flags=re.MULTILINE)
        grpc_stub.write_text(text, encoding="utf-8")
        written += [out_dir / f"{stem}_pb2.py", out_dir / f"{stem}_pb2.pyi", grpc_stub]
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_DIR):
        print(path)
