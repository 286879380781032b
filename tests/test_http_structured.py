"""Structured outputs over the HTTP API, with the official ``openai`` client against the shared server on loopback:
OpenAI's ``response_format`` (json_object, json_schema), vLLM's ``structured_outputs`` (and its older
``guided_*`` names) for regex, choice and grammar, on chat and completions, streamed and not, ``n`` = 2; forced
tool calls (``tool_choice`` "required" or a named function) coming back as ``tool_calls`` whose arguments
validate against the tool's schema; and a bad constraint is a 400 naming the problem.

glm-tiny has random weights: sampled freely at temperature 1.0 it writes gibberish, so every reply that parses and
validates here is the grammar's doing. The engine-level tests sample hundreds of outputs; these prove the wiring.
Seeds keep every run the same.
"""
from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from glmserve.engine.entrypoints.grpc.client import _sampling, collect  # noqa: E402
from glmserve.engine.entrypoints.grpc.proto_convert import structured_from_proto  # noqa: E402
from glmserve.engine.entrypoints.http.protocol import CompletionRequest  # noqa: E402
from glmserve.engine.entrypoints.http.structured import structured_output  # noqa: E402
from glmserve.engine.structured.grammars import cache_key  # noqa: E402

from .server_fixtures import MODEL, client, session_server, shared_server  # noqa: E402,F401 (fixtures)

# Nested objects, arrays, enums, bounded numbers, required and optional fields.
PLAYER = {"type": "object",
          "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 8},
                         "score": {"type": "integer", "minimum": 0, "maximum": 100},
                         "tags": {"type": "array", "items": {"enum": ["x", "y", "z"]}, "maxItems": 3},
                         "team": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1},
                                                                   "active": {"type": "boolean"}},
                                  "required": ["id"]}},
          "required": ["name", "score"]}
READING = {"type": "object",
           "properties": {"value": {"type": "number", "minimum": -5, "maximum": 5},
                          "unit": {"enum": ["C", "F"]},
                          "when": {"type": "string", "pattern": "^[0-2][0-9]:[0-5][0-9]$"}},
           "required": ["value", "unit", "when"], "additionalProperties": False}
SCHEMAS = {"player": PLAYER, "reading": READING}
FUNCTION = {"name": "get_weather", "description": "Weather for a city",
            "parameters": {"type": "object",
                           "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 6},
                                          "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                          "unit": {"enum": ["celsius", "fahrenheit"]}},
                           "required": ["city"]}}
TOOLS = [{"type": "function", "function": FUNCTION},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
CHAT = [{"role": "user", "content": "Describe the player as JSON"}]
PROMPT = "A player, as JSON:"
SAMPLED = dict(temperature=1.0, max_tokens=200)
DATE = r"20\d\d-(0[1-9]|1[0-2])-[0-3]\d"
COUNTING = 'root ::= "one" (", " ("two" | "three"))*'


@pytest.fixture
def api(shared_server) -> openai.OpenAI:
    with openai.OpenAI(base_url=shared_server.base_url, api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def json_schema_format(schema: dict, strict: bool = True) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": strict}}


def chat_choices(api, stream: bool, **kwargs) -> list[dict]:
    """Each choice's content, tool calls and finish reason, read from the whole answer or from its stream."""
    reply = api.chat.completions.create(model=MODEL, stream=stream, **kwargs)
    if not stream:
        return [{"content": c.message.content, "tool_calls": c.message.tool_calls or [],
                 "finish_reason": c.finish_reason} for c in reply.choices]
    choices: dict[int, dict] = {}
    for chunk in reply:
        for c in chunk.choices:
            choice = choices.setdefault(c.index, {"content": "", "tool_calls": [], "finish_reason": None})
            choice["content"] += c.delta.content or ""
            choice["tool_calls"] += c.delta.tool_calls or []
            assert choice["finish_reason"] is None, "text after the finish reason"
            choice["finish_reason"] = c.finish_reason
    return [choices[i] for i in sorted(choices)]


def completion_choices(api, stream: bool, **kwargs) -> list[tuple[str, str]]:
    """(text, finish reason) of each choice."""
    reply = api.completions.create(model=MODEL, stream=stream, **kwargs)
    if not stream:
        return [(c.text, c.finish_reason) for c in reply.choices]
    texts: dict[int, list] = {}
    for chunk in reply:
        for c in chunk.choices:
            entry = texts.setdefault(c.index, ["", None])
            entry[0] += c.text
            entry[1] = c.finish_reason or entry[1]
    return [tuple(texts[i]) for i in sorted(texts)]


# ---- one conversion -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("http, grpc_kwargs", [
    ({"response_format": json_schema_format(PLAYER)}, {"json_schema": json.dumps(PLAYER, ensure_ascii=False)}),
    ({"structured_outputs": {"json": PLAYER}}, {"json_schema": json.dumps(PLAYER, ensure_ascii=False)}),
    ({"guided_json": PLAYER}, {"json_schema": json.dumps(PLAYER, ensure_ascii=False)}),
    ({"response_format": {"type": "json_object"}}, {"json_object": True}),
    ({"structured_outputs": {"json_object": True}}, {"json_object": True}),
    ({"structured_outputs": {"regex": DATE}}, {"regex": DATE}),
    ({"guided_regex": DATE}, {"regex": DATE}),
    ({"structured_outputs": {"choice": ["a", "b"], "disable_any_whitespace": True}}, {"choice": ["a", "b"]}),
    ({"guided_choice": ["a", "b"]}, {"choice": ["a", "b"]}),
    ({"structured_outputs": {"grammar": COUNTING}}, {"grammar": COUNTING}),
    ({"guided_grammar": COUNTING}, {"grammar": COUNTING}),
])
def test_every_http_spelling_is_the_grpc_apis_structured_output(http, grpc_kwargs):
    """The same StructuredOutput as the gRPC API's oneof (so the same checks, grammar and compiled-grammar cache)."""
    over_http = structured_output(CompletionRequest(prompt="x", **http))
    over_grpc = structured_from_proto(_sampling(grpc_kwargs))
    assert over_http.kind == over_grpc.kind
    assert cache_key(over_http, chat=True) == cache_key(over_grpc, chat=True)


def test_no_constraint_and_text_are_unconstrained():
    assert structured_output(CompletionRequest(prompt="x")) is None
    assert structured_output(CompletionRequest(prompt="x", response_format={"type": "text"})) is None


def test_greedy_structured_replies_equal_grpcs(api, client):
    """At temperature 0, HTTP and gRPC run the same grammar on the same prompt: the same text, and the same call."""
    over_http = chat_choices(api, False, messages=CHAT, temperature=0.0, max_tokens=120,
                             response_format=json_schema_format(PLAYER))[0]["content"]
    [over_grpc] = collect(client.chat(CHAT, json_schema=PLAYER, temperature=0.0, max_tokens=120))
    assert over_http == over_grpc.text and over_grpc.finish_reason == "stop"
    ((text, _),) = completion_choices(api, False, prompt=PROMPT, temperature=0.0, max_tokens=40,
                                      extra_body={"structured_outputs": {"regex": DATE}})
    [over_grpc] = collect(client.generate(PROMPT, regex=DATE, temperature=0.0, max_tokens=40))
    assert text == over_grpc.text
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    (choice,) = chat_choices(api, True, messages=messages, tools=TOOLS, tool_choice="required", temperature=0.0,
                             max_tokens=120)
    [over_grpc] = collect(client.chat(messages, tools=[t["function"] for t in TOOLS], tool_choice="required",
                                      temperature=0.0, max_tokens=120))
    (call,) = choice["tool_calls"]
    assert over_grpc.finish_reason == "tool_call"
    assert (call.function.name, json.loads(call.function.arguments)) == (over_grpc.tool_call.name,
                                                                         over_grpc.tool_call.arguments)


# ---- JSON -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_chat_json_schema_replies_validate(api, stream):
    for seed, (name, schema) in enumerate(SCHEMAS.items()):
        choices = chat_choices(api, stream, messages=CHAT, n=2, seed=seed, response_format=json_schema_format(schema),
                               **SAMPLED)
        assert len(choices) == 2
        for choice in choices:
            assert choice["finish_reason"] == "stop" and not choice["tool_calls"], (name, choice)
            jsonschema.validate(json.loads(choice["content"]), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_completion_json_schema_replies_validate(api, stream):
    for seed, schema in enumerate(SCHEMAS.values()):
        choices = completion_choices(api, stream, prompt=PROMPT, n=2, seed=10 + seed,
                                     extra_body={"response_format": json_schema_format(schema, strict=False)},
                                     **SAMPLED)
        assert len(choices) == 2
        for text, finish in choices:
            assert finish == "stop", text
            jsonschema.validate(json.loads(text), schema)


class Reading(BaseModel):
    value: int = Field(ge=-50, le=50)
    unit: Literal["C", "F"]
    ok: bool
    station: str = Field(min_length=1, max_length=8)


def test_the_clients_own_parse_helper(api):
    """``chat.completions.parse`` sends a pydantic model as a strict json_schema and reads the reply back into it."""
    reply = api.chat.completions.parse(model=MODEL, messages=CHAT, response_format=Reading, n=2, seed=4,
                                       temperature=1.0, max_tokens=100)
    for choice in reply.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Reading)
        jsonschema.validate(json.loads(choice.message.content), Reading.model_json_schema())


@pytest.mark.parametrize("stream", [False, True])
def test_json_object_replies_are_objects(api, stream):
    """Free-form JSON rarely closes on random weights: every reply starts an object, the finished ones parse."""
    texts = [(c["content"], c["finish_reason"]) for c in
             chat_choices(api, stream, messages=CHAT, n=4, seed=1, temperature=1.0, max_tokens=32,
                          response_format={"type": "json_object"})]
    texts += completion_choices(api, stream, prompt=PROMPT, n=4, seed=2, temperature=1.0, max_tokens=32,
                                extra_body={"response_format": {"type": "json_object"}})
    finished = [text for text, finish in texts if finish == "stop"]
    assert finished, texts
    for text in finished:
        assert isinstance(json.loads(text), dict)
    for text, finish in texts:
        assert text.startswith("{") and finish in ("stop", "length")


def test_a_text_response_format_is_free(api):
    choices = chat_choices(api, False, messages=CHAT, temperature=0.0, max_tokens=6, response_format={"type": "text"},
                           extra_body={"ignore_eos": True, "min_tokens": 6})
    assert choices[0]["finish_reason"] == "length"


# ---- regex, choice, grammar -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_structured_outputs_regex_choice_and_grammar(api, stream):
    cases = [({"regex": DATE}, lambda t: re.fullmatch(DATE, t)),
             ({"choice": ["yes", "no", "ask again"]}, lambda t: t in ("yes", "no", "ask again")),
             ({"grammar": COUNTING}, lambda t: re.fullmatch(r"one(, (two|three))*", t))]
    for seed, (spec, valid) in enumerate(cases):
        texts = completion_choices(api, stream, prompt=PROMPT, n=2, seed=seed,
                                   extra_body={"structured_outputs": spec}, **SAMPLED)
        texts += [(c["content"], c["finish_reason"]) for c in
                  chat_choices(api, stream, messages=CHAT, n=2, seed=seed, extra_body={"structured_outputs": spec},
                               **SAMPLED)]
        assert len(texts) == 4
        for text, finish in texts:
            assert finish == "stop" and valid(text), (spec, text)


def test_vllms_older_guided_fields(api):
    cases = [("guided_json", PLAYER, lambda t: jsonschema.validate(json.loads(t), PLAYER) is None),
             ("guided_regex", DATE, lambda t: re.fullmatch(DATE, t)),
             ("guided_choice", ["left", "right"], lambda t: t in ("left", "right")),
             ("guided_grammar", COUNTING, lambda t: re.fullmatch(r"one(, (two|three))*", t))]
    for seed, (name, value, valid) in enumerate(cases):
        ((text, finish),) = completion_choices(api, False, prompt=PROMPT, seed=seed, extra_body={name: value},
                                               **SAMPLED)
        assert finish == "stop" and valid(text), (name, text)


# ---- tool calls -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("tool_choice, names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
])
def test_a_forced_tool_call_comes_back_as_tool_calls(api, stream, tool_choice, names):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(2):
        choices = chat_choices(api, stream, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                               tool_choice=tool_choice, n=2, seed=seed, **SAMPLED)
        assert len(choices) == 2
        for choice in choices:
            assert choice["finish_reason"] == "tool_calls", choice
            assert not choice["content"]                  # the call's code is not shown as text
            (call,) = choice["tool_calls"]
            assert call.type == "function" and call.id.startswith("call_")
            assert call.function.name in names
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_json_schema_with_tools_offered_answers_in_json(api):
    """With tools in the prompt and tool_choice "auto", a response_format constrains the content: the reply is the
    JSON, not a call."""
    (choice,) = chat_choices(api, True, messages=CHAT, tools=TOOLS, seed=3, response_format=json_schema_format(PLAYER),
                             **SAMPLED)
    assert choice["finish_reason"] == "stop" and not choice["tool_calls"]
    jsonschema.validate(json.loads(choice["content"]), PLAYER)


# ---- bad constraints ------------------------------------------------------------------------------------------------
def error_of(exc: openai.APIStatusError) -> dict:
    assert exc.status_code == 400 and set(exc.body) == {"message", "type", "param", "code"}, exc.body
    assert exc.body["type"] == "invalid_request_error"
    return exc.body


@pytest.mark.parametrize("kwargs, param, words", [
    ({"response_format": json_schema_format({"type": "objekt"})}, "response_format.json_schema.schema", ["objekt"]),
    ({"response_format": json_schema_format({"oneOf": [{"type": "integer"}, {"type": "number"}]})},
     "response_format.json_schema.schema", ["oneOf"]),
    ({"response_format": json_schema_format({"type": "object", "required": ["a"]})},
     "response_format.json_schema.schema", ["'a'"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format.json_schema.schema", ["required"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "{}"}}},
     "response_format.json_schema.schema", ["object"]),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ["object"]),
    ({"response_format": {"type": "xml"}}, "response_format.type", ["'xml'"]),
    ({"extra_body": {"structured_outputs": {"regex": "(unclosed"}}}, "structured_outputs.regex", ["parenthesis"]),
    ({"extra_body": {"structured_outputs": {"regex": "(?<=x)y"}}}, "structured_outputs.regex", ["Lookbehind"]),
    ({"extra_body": {"structured_outputs": {"grammar": 'root ::= "a'}}}, "structured_outputs.grammar",
     ["string literal"]),
    ({"extra_body": {"structured_outputs": {"grammar": 'main ::= "a"'}}}, "structured_outputs.grammar", ["root"]),
    ({"extra_body": {"structured_outputs": {"choice": []}}}, "structured_outputs.choice", ["non-empty"]),
    ({"extra_body": {"structured_outputs": {"choice": "yes"}}}, "structured_outputs.choice", ["list"]),
    ({"extra_body": {"structured_outputs": {"json": "{not json"}}}, "structured_outputs.json", ["not valid JSON"]),
    ({"extra_body": {"structured_outputs": {"structural_tag": "{}"}}}, "structured_outputs.structural_tag",
     ["not supported"]),
    ({"extra_body": {"structured_outputs": {"regx": "a"}}}, "structured_outputs.regx", ["unknown"]),
    ({"extra_body": {"structured_outputs": {}}}, "structured_outputs", ["one of"]),
    ({"extra_body": {"guided_regex": ""}}, "guided_regex", ["non-empty"]),
    ({"extra_body": {"guided_json": {"type": "object", "not": {}}}}, "guided_json", ["'not'"]),
    # more than one constraint
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs.choice",
     ["one structured-output constraint", "structured_outputs.regex"]),
    ({"response_format": {"type": "json_object"}, "extra_body": {"structured_outputs": {"regex": "a"}}},
     "structured_outputs.regex", ["one structured-output constraint", "response_format"]),
    ({"extra_body": {"structured_outputs": {"regex": "a"}, "guided_choice": ["b"]}}, "guided_choice",
     ["one structured-output constraint"]),
    # tool_choice
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", ["'nope'"]),
    ({"tool_choice": "required"}, "tool_choice", ["needs tools"]),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ["'sometimes'"]),
    ({"tools": TOOLS, "tool_choice": {"name": "get_time"}}, "tool_choice", ['"type": "function"']),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     ["structured"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}}}], "tool_choice": "required"},
     "tools", ["'pattern'"]),
])
@pytest.mark.parametrize("stream", [False, True])
def test_bad_chat_constraints_are_400_naming_the_problem(api, kwargs, param, words, stream):
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, stream=stream, **kwargs)
    error = error_of(info.value)
    assert error["param"] == param, error
    for word in [param, *words]:
        assert word in error["message"], error


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": json_schema_format({"type": "objekt"})}, "response_format.json_schema.schema", ["objekt"]),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs.regex", ["parenthesis"]),
    ({"guided_grammar": 'root ::= "a'}, "guided_grammar", ["string literal"]),
    ({"structured_outputs": {"json_object": True}, "guided_regex": "a"}, "guided_regex",
     ["one structured-output constraint"]),
])
def test_bad_completion_constraints_are_400_naming_the_problem(api, extra, param, words):
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, extra_body=extra)
    error = error_of(info.value)
    assert error["param"] == param, error
    for word in [param, *words]:
        assert word in error["message"], error
