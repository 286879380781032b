"""Structured outputs over a real gRPC server on loopback: the oneof in SamplingParams, tool_choice in Chat, and
INVALID_ARGUMENT naming the problem for a bad schema, regex, grammar or tool choice."""
from __future__ import annotations

import json
import re

import grpc
import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from glmserve.engine.entrypoints.grpc.client import collect  # noqa: E402
from glmserve.proto import generation_pb2 as pb  # noqa: E402

from .server_fixtures import client, session_server, shared_server, wait_idle  # noqa: E402,F401 (fixtures)

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 5},
                                           "score": {"type": "integer", "minimum": 0, "maximum": 100},
                                           "tags": {"type": "array", "items": {"enum": ["x", "y"]}, "maxItems": 2}},
          "required": ["name", "score"]}
TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                                          "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                         "required": ["city"]}},
         {"name": "get_time", "parameters": {"type": "object", "properties": {}}}]
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
SAMPLED = dict(temperature=1.0, max_tokens=200)


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_generate_with_a_json_schema_streams_valid_json(client):
    for seed in range(4):
        [sample] = collect(client.generate("Describe a player", json_schema=json.dumps(SCHEMA), seed=seed, **SAMPLED))
        assert sample.finish_reason == "stop"
        jsonschema.validate(json.loads(sample.text), SCHEMA)


def test_generate_with_choice_regex_and_grammar(client):
    [choice] = collect(client.generate("Yes or no?", choice=["yes", "no"], stream=False, **SAMPLED))
    assert choice.text in ("yes", "no") and choice.finish_reason == "stop"
    [regex] = collect(client.generate("A date", regex=r"20\d\d-(0[1-9]|1[0-2])", **SAMPLED))
    assert re.fullmatch(r"20\d\d-(0[1-9]|1[0-2])", regex.text)
    [grammar] = collect(client.generate("Count", grammar='root ::= "one" (", " ("two" | "three"))*', **SAMPLED))
    samples = collect(client.generate("Count", grammar='root ::= "a" [0-9]{2}', n=3, **SAMPLED))
    assert re.fullmatch(r"one(, (two|three))*", grammar.text)
    assert len(samples) == 3 and all(re.fullmatch(r"a[0-9]{2}", s.text) for s in samples)


def test_json_object_false_means_unconstrained(client):
    [sample] = collect(client.generate("hi", json_object=False, max_tokens=4, temperature=0.0, ignore_eos=True))
    assert sample.finish_reason == "length"


def test_chat_with_a_schema_returns_the_json_content(client):
    [sample] = collect(client.chat(CHAT, json_schema=SCHEMA, seed=3, **SAMPLED))
    assert sample.finish_reason == "stop"
    jsonschema.validate(json.loads(sample.text), SCHEMA)


@pytest.mark.parametrize("tool_choice,names", [("required", {"get_weather", "get_time"}),
                                               ({"name": "get_weather"}, {"get_weather"}),
                                               ({"type": "function", "function": {"name": "get_time"}}, {"get_time"})])
def test_a_forced_tool_call_always_parses(client, tool_choice, names):
    for seed in range(3):
        [sample] = collect(client.chat(CHAT, tools=TOOLS, tool_choice=tool_choice, seed=seed, **SAMPLED))
        assert sample.finish_reason == "tool_call", sample.text
        assert sample.tool_call.name in names
        schema = next(t["parameters"] for t in TOOLS if t["name"] == sample.tool_call.name)
        jsonschema.validate(sample.tool_call.arguments, schema)


@pytest.mark.parametrize("sampling,words", [
    ({"json_schema": '{"type": "objekt"}'}, ["structured.json_schema", "objekt"]),
    ({"json_schema": "{not json"}, ["structured.json_schema", "not valid JSON"]),
    ({"json_schema": '{"oneOf": [{"type": "integer"}, {"type": "number"}]}'}, ["structured.json_schema", "oneOf"]),
    ({"json_schema": '{"type": "object", "required": ["a"]}'}, ["structured.json_schema", "'a'"]),
    ({"regex": "(unclosed"}, ["structured.regex", "parenthesis"]),
    ({"regex": "(?<=x)y"}, ["structured.regex", "Lookbehind"]),
    ({"grammar": 'root ::= "a'}, ["structured.grammar", "string literal"]),
    ({"grammar": 'main ::= "a"'}, ["structured.grammar", "root"]),
    ({"choice": []}, ["structured.choice", "non-empty"]),
    ({"choice": ["ok", ""]}, ["structured.choice", "non-empty"]),
])
def test_bad_structured_requests_are_invalid_argument_naming_the_problem(client, sampling, words):
    err = rpc_error(lambda: list(client.generate("hello", **sampling)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in err.details(), err.details()


@pytest.mark.parametrize("kwargs,words", [
    ({"tools": TOOLS, "tool_choice": {"name": "nope"}}, ["tool_choice", "'nope'"]),
    ({"tool_choice": "required"}, ["tool_choice", "needs tools"]),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, ["tool_choice", "'sometimes'"]),
    ({"tools": TOOLS, "tool_choice": "required", "regex": "a"}, ["tool_choice", "structured"]),
    ({"tools": [{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string",
                                                                                  "pattern": "a+"}}}}],
      "tool_choice": "required"}, ["tools", "'pattern'"]),
    ({"tools": [{"name": "f", "parameters": {"type": "object", "properties": {"class": {"type": "integer"}}}}],
      "tool_choice": "required"}, ["tools", "'class'"]),
])
def test_bad_tool_choices_are_invalid_argument(client, kwargs, words):
    err = rpc_error(lambda: list(client.chat(CHAT, max_tokens=8, **kwargs)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in words:
        assert word in err.details(), err.details()


def test_auto_tool_choice_stays_free(client):
    """The dummy model writes no tool call by itself: with "auto" the reply is whatever it samples."""
    [sample] = collect(client.chat(CHAT, tools=TOOLS, tool_choice="auto", max_tokens=6, temperature=0.0,
                                   ignore_eos=True, min_tokens=6))
    assert sample.finish_reason == "length" and sample.tool_call is None


def test_the_proto_oneof_holds_one_kind():
    msg = pb.SamplingParams(regex="a")
    msg.choice.CopyFrom(pb.ChoiceList(choices=["x"]))
    assert msg.WhichOneof("structured") == "choice" and not msg.HasField("regex")


@pytest.mark.subprocess
def test_structured_requests_through_an_engine_core_process():
    """``glmserve serve`` runs the engine core in its own process: the request's StructuredOutput crosses the
    process boundary, the grammar compiles there, and a bad one is still refused by the frontend."""
    from glmserve.engine.entrypoints.grpc.client import GenerationClient

    from .server_fixtures import ServeProcess
    proc = ServeProcess()
    try:
        proc.wait_for_line("glmserve: ready")
        with GenerationClient(proc.target) as c:
            [sample] = collect(c.generate("hi", json_schema=SCHEMA, seed=1, **SAMPLED))
            jsonschema.validate(json.loads(sample.text), SCHEMA)
            [call] = collect(c.chat(CHAT, tools=TOOLS, tool_choice="required", seed=2, **SAMPLED))
            assert call.finish_reason == "tool_call" and call.tool_call.name in {"get_weather", "get_time"}
            err = rpc_error(lambda: list(c.generate("hi", regex="(", max_tokens=4)))
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "structured.regex" in err.details()
    finally:
        proc.close()
