"""The committed gRPC stubs must be what ``proto/generate.py`` makes of ``proto/generation.proto`` today."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("grpc_tools")

from glmserve.proto import generate  # noqa: E402

# Lines that name the generating tool's version, not anything from the .proto: a newer grpcio-tools must not read
# as drift.
_VERSION_LINES = [
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"ValidateProtobufRuntimeVersion\([^)]*\)", re.DOTALL),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
]


def _normalized(text: str) -> str:
    for pattern in _VERSION_LINES:
        text = pattern.sub("<version>", text)
    return text


def test_committed_stubs_match_the_proto(tmp_path):
    for fresh in generate.generate(tmp_path):
        committed = generate.PROTO_DIR / fresh.name
        assert committed.is_file(), f"{committed.name} is missing: run python proto/generate.py"
        assert _normalized(committed.read_text()) == _normalized(fresh.read_text()), (
            f"{committed.name} is out of date with generation.proto: run python proto/generate.py")


def test_the_service_stub_imports_its_messages_relatively():
    text = (generate.PROTO_DIR / "generation_pb2_grpc.py").read_text()
    assert "from . import generation_pb2 as generation__pb2" in text
    assert not re.search(r"^import generation_pb2", text, re.MULTILINE)


def test_the_api_is_versioned():
    from glmserve.proto import generation_pb2 as pb
    assert pb.DESCRIPTOR.package == "glmserve.v1"
    assert set(pb.DESCRIPTOR.services_by_name["Generation"].methods_by_name) == {
        "Generate", "Chat", "Tokenize", "Abort", "GetModelInfo", "GetLoad", "LoadAdapter", "UnloadAdapter",
        "ListAdapters"}
    assert Path(pb.__file__).with_name("generation.proto").is_file()
