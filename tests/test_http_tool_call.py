"""Tool calls over the HTTP API with the official client: ``tools`` become ChatGLM3's tools prompt, a reply that
stops on <|observation|> comes back as ``tool_calls`` (``finish_reason: "tool_calls"``), and the assistant's
``tool_calls`` plus a ``tool`` message continue the conversation exactly as ChatGLM3 writes it.

Dummy weights never write a tool call, so the replies are scripted (``scripted_replies``, keyed by the request id
the client sends as ``X-Request-Id``): the model still runs, its sampled ids are replaced by the tokenizer's own
encoding of the reply ChatGLM3 would write.
"""
from __future__ import annotations

import json

import openai
import pytest

from glmserve.engine.entrypoints.http.chat_api import tool_call_message
from glmserve.engine.entrypoints.http.protocol import ToolCallIn
from glmserve.engine.text.chat_format import build_chat_prompt, messages_from_json
from glmserve.engine.text.tool_call import parse_tool_call

from .server_fixtures import client, http_json, scripted_replies, session_server, shared_server  # noqa: F401

MODEL = "glm-tiny"
FUNCTION = {"name": "get_weather", "description": "Current weather of a city",
            "parameters": {"type": "object", "properties": {"city_name": {"type": "string"},
                                                            "days": {"type": "integer"}},
                           "required": ["city_name"]}}
TOOLS = [{"type": "function", "function": FUNCTION}]
SYSTEM = {"role": "system", "content": "Answer as best you can. You can use these tools:"}
USER = {"role": "user", "content": "What is the weather in Beijing for 3 days?"}
# What the model writes for the call (and what the rendering of an earlier call must reproduce).
CALL_CODE = "```python\ntool_call(city_name='Beijing', days=3)\n```"


@pytest.fixture
def api(shared_server) -> openai.OpenAI:
    with openai.OpenAI(base_url=shared_server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def tok(shared_server):
    return shared_server.engine.tokenizer


def reply_ids(tok, metadata: str, content: str, end: str) -> list[int]:
    """What the model writes after <|assistant|>: metadata line, content, then the token that ends the turn."""
    end_id = tok.eos_token_id if end == "eos" else tok.special_token_ids[end]
    return (tok.encode(metadata + "\n", add_special_tokens=False) + tok.encode(content, add_special_tokens=False)
            + [end_id])


def ask(api, messages, request_id, stream, **kwargs):
    """(content, tool_calls, finish_reason) of one chat call, streamed or not."""
    reply = api.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, temperature=0.0, stream=stream,
                                        extra_headers={"X-Request-Id": request_id}, **kwargs)
    if not stream:
        (choice,) = reply.choices
        return choice.message.content, choice.message.tool_calls, choice.finish_reason
    content, calls, finish = "", [], None
    for chunk in reply:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_round_trip(api, client, shared_server, tok, stream):
    call = reply_ids(tok, "get_weather", CALL_CODE, "<|observation|>")
    answer = reply_ids(tok, "", "It is sunny, 21 degrees.", "eos")
    with scripted_replies(shared_server.engine, {"call": call, "answer": answer}):
        content, calls, finish = ask(api, [SYSTEM, USER], "call", stream, max_tokens=len(call) + 5)
        assert finish == "tool_calls"
        assert not content                               # the call's code is not shown as text
        (tool_call,) = calls
        assert tool_call.type == "function" and tool_call.id.startswith("call_")
        assert tool_call.function.name == "get_weather"
        assert json.loads(tool_call.function.arguments) == {"city_name": "Beijing", "days": 3}

        history = [SYSTEM, USER,
                   {"role": "assistant", "content": None, "tool_calls": [
                       {"id": tool_call.id, "type": "function",
                        "function": {"name": tool_call.function.name, "arguments": tool_call.function.arguments}}]},
                   {"role": "tool", "tool_call_id": tool_call.id,
                    "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
        content, calls, finish = ask(api, history, "answer", stream, max_tokens=40)
    assert (content, finish) == ("It is sunny, 21 degrees.", "stop")
    assert not calls

    # The history went to the model as ChatGLM3 writes it: the call under its tool name, the result as an
    # observation (the same prompt the gRPC API builds from ChatGLM3's own message form).
    chatglm3_history = [dict(SYSTEM, tools=[FUNCTION]), USER,
                        {"role": "assistant", "metadata": "get_weather", "content": CALL_CODE},
                        {"role": "observation", "content": history[3]["content"]}]
    expected = build_chat_prompt(tok, messages_from_json(chatglm3_history))
    status, body = http_json(f"http://127.0.0.1:{shared_server.server.http_port}/tokenize",
                             {"messages": history, "tools": TOOLS})
    assert status == 200 and body["tokens"] == expected
    assert client.tokenize(messages=[SYSTEM, USER, chatglm3_history[2], chatglm3_history[3]],
                           tools=[FUNCTION]) == expected


@pytest.mark.parametrize("stream", [False, True])
def test_a_plain_reply_with_tools_streams_as_text(api, shared_server, tok, stream):
    answer = reply_ids(tok, "", "No tool needed.", "eos")
    with scripted_replies(shared_server.engine, {"plain": answer}):
        content, calls, finish = ask(api, [SYSTEM, USER], "plain", stream, max_tokens=40, logprobs=True)
    assert (content, finish) == ("No tool needed.", "stop") and not calls


@pytest.mark.parametrize("stream", [False, True])
def test_an_unparsable_call_comes_back_as_text(api, shared_server, tok, stream):
    bad_code = "```python\n__import__('os').system('true')\n```"
    bad = reply_ids(tok, "get_weather", bad_code, "<|observation|>")
    with scripted_replies(shared_server.engine, {"bad": bad}):
        content, calls, finish = ask(api, [SYSTEM, USER], "bad", stream, max_tokens=len(bad) + 5)
    assert finish == "stop" and not calls
    assert content == tok.decode(bad)    # the reply as the model wrote it (the observation token skipped)
    assert content.startswith("get_weather\n") and "__import__" in content


def test_tool_choice_none_leaves_the_tools_out(api, client):
    def prompt_tokens(**kwargs) -> int:
        return api.chat.completions.create(model=MODEL, messages=[SYSTEM, USER], max_tokens=1,
                                           **kwargs).usage.prompt_tokens
    assert prompt_tokens(tools=TOOLS, tool_choice="none") == len(client.tokenize(messages=[SYSTEM, USER]))
    assert prompt_tokens(tools=TOOLS) == len(client.tokenize(messages=[SYSTEM, USER], tools=[FUNCTION]))


@pytest.mark.parametrize("arguments", [
    {"city_name": "Beijing", "days": 3},
    {"q": "it's \"quoted\"\n", "n": -1.5, "flags": [True, False, None], "nested": {"a": [1, {"b": "c"}]}},
    {},
])
def test_a_rendered_call_parses_back_to_its_arguments(arguments):
    message = tool_call_message(ToolCallIn(function={"name": "f", "arguments": json.dumps(arguments)}),
                                "messages[0].tool_calls[0]")
    assert message.role == "assistant" and message.metadata == "f"
    parsed = parse_tool_call(message.metadata + "\n" + message.content)
    assert (parsed.name, parsed.arguments) == ("f", arguments)


def test_log_probs_of_held_text_arrive_with_it(api, shared_server, tok):
    """With tools, a reply's first text is held until it is clear it is not a call: its log-probs wait with it,
    and every token gets exactly one entry, streamed or not."""
    answer = reply_ids(tok, "", "No tool needed.", "eos")
    with scripted_replies(shared_server.engine, {"*": answer}):
        whole = api.chat.completions.create(model=MODEL, messages=[SYSTEM, USER], tools=TOOLS, max_tokens=40,
                                            logprobs=True, top_logprobs=1)
        streamed = api.chat.completions.create(model=MODEL, messages=[SYSTEM, USER], tools=TOOLS, max_tokens=40,
                                               logprobs=True, top_logprobs=1, stream=True)
        entries = [e for c in streamed for ch in c.choices if ch.logprobs for e in ch.logprobs.content]
    assert len(whole.choices[0].logprobs.content) == whole.usage.completion_tokens == len(answer)
    assert [e.token for e in entries] == [e.token for e in whole.choices[0].logprobs.content]
