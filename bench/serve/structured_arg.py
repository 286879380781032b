"""``--structured KIND[:VALUE]``: every well-behaved request of a serve benchmark asks for structured output.

    json_schema:FILE    a JSON Schema file          regex:PATTERN       the whole reply matches PATTERN
    grammar:FILE        an EBNF grammar file        choice:A,B,C        one of these strings
    json_object         any JSON object

The server ends a structured reply once its grammar is complete, so replies can be shorter than --output-len.
Over gRPC the kinds are fields of the request's SamplingParams (the gRPC client's names); over HTTP they are sent
as the OpenAI-compatible servers take them (:func:`openai_fields`).
"""
from __future__ import annotations

import json
from pathlib import Path

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def parse_structured(text: str) -> dict:
    """The sampling keyword arguments (the gRPC client's names) for one ``--structured`` value; ValueError naming
    what is wrong."""
    kind, sep, value = text.partition(":")
    if kind not in KINDS:
        raise ValueError(f"--structured: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "json_object":
        if sep:
            raise ValueError("--structured: json_object takes no value")
        return {"json_object": True}
    if not value:
        raise ValueError(f"--structured: {kind} needs a value ({kind}:...)")
    if kind == "regex":
        return {"regex": value}
    if kind == "choice":
        return {"choice": [c for c in value.split(",") if c]}
    try:
        content = Path(value).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"--structured: cannot read {value}: {exc.strerror or exc}") from None
    if kind == "json_schema":
        try:
            json.loads(content)
        except ValueError as exc:
            raise ValueError(f"--structured: {value} is not JSON: {exc}") from None
    return {kind: content}


def openai_fields(structured: dict) -> dict:
    """The request-body fields that ask an OpenAI-compatible server (glmserve's, vLLM >= 0.10's) for the same
    constraint: OpenAI's ``response_format`` for JSON, vLLM's ``structured_outputs`` for regex, choice, grammar."""
    ((kind, value),) = structured.items()
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        schema = json.loads(value) if isinstance(value, str) else value
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": "bench", "schema": schema, "strict": True}}}
    if kind not in KINDS:
        raise ValueError(f"unknown structured-output kind {kind!r}")
    return {"structured_outputs": {kind: value}}
