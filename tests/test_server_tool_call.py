"""Tool calls through Chat: a reply stopped by <|observation|> comes back as TOOL_CALL with parsed arguments, and an
observation message continues the conversation.

Dummy weights never write a tool call, so the replies are scripted (``scripted_replies``): the model still runs,
its sampled ids are replaced by the tokenizer's own encoding of the reply ChatGLM3 would write.
"""
from __future__ import annotations

import json

import pytest

from glmserve.engine.text.chat_format import build_chat_prompt, messages_from_json

from .server_fixtures import client, scripted_replies, session_server, shared_server  # noqa: F401 (fixtures)

TOOLS = [{"name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city_name": {"type": "string"}, "days": {"type": "integer"}},
                         "required": ["city_name"]}}]
SYSTEM = {"role": "system", "content": "Answer as best you can. You can use these tools:"}
USER = {"role": "user", "content": "What is the weather in Beijing for 3 days?"}
CALL_CODE = '```python\ntool_call(city_name="Beijing", days=3)\n```'


@pytest.fixture
def tok(shared_server):
    return shared_server.engine.tokenizer


def reply_ids(tok, metadata: str, content: str, end: str) -> list[int]:
    """What the model writes after <|assistant|>: metadata line, content, then the token that ends the turn."""
    end_id = tok.eos_token_id if end == "eos" else tok.special_token_ids[end]
    return (tok.encode(metadata + "\n", add_special_tokens=False) + tok.encode(content, add_special_tokens=False)
            + [end_id])


@pytest.mark.parametrize("stream", [True, False])
def test_tool_call_round_trip(client, shared_server, tok, stream):
    call = reply_ids(tok, "get_weather", CALL_CODE, "<|observation|>")
    answer = reply_ids(tok, "", "It is sunny, 21 degrees.", "eos")
    with scripted_replies(shared_server.engine, {"call": call, "answer": answer}):
        chunks = list(client.chat([SYSTEM, USER], tools=TOOLS, request_id="call", max_tokens=len(call) + 5,
                                  temperature=0.0, stream=stream))
        last = chunks[-1]
        assert last.finish_reason == "tool_call"
        assert last.tool_call.name == "get_weather"
        assert last.tool_call.arguments == {"city_name": "Beijing", "days": 3}
        assert "tool_call(" in "".join(c.text for c in chunks)   # the text comes back too

        history = [SYSTEM, USER, {"role": "assistant", "metadata": "get_weather", "content": CALL_CODE},
                   {"role": "observation", "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
        prompt = client.tokenize(messages=history, tools=TOOLS)
        assert prompt == build_chat_prompt(tok, messages_from_json([dict(SYSTEM, tools=TOOLS)] + history[1:]))
        assert tok.special_token_ids["<|observation|>"] in prompt
        chunks = list(client.chat(history, tools=TOOLS, request_id="answer", max_tokens=40, temperature=0.0,
                                  stream=stream))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].tool_call is None
    assert "".join(c.text for c in chunks) == "It is sunny, 21 degrees."


def test_unparsable_tool_call_comes_back_as_text(client, shared_server, tok):
    bad = reply_ids(tok, "get_weather", "```python\n__import__('os').system('true')\n```", "<|observation|>")
    with scripted_replies(shared_server.engine, {"bad": bad}):
        chunks = list(client.chat([SYSTEM, USER], tools=TOOLS, request_id="bad", max_tokens=len(bad) + 5,
                                  stream=False))
    (last,) = chunks
    assert last.finish_reason == "stop" and last.tool_call is None
    assert "__import__" in last.text


def test_generate_never_parses_tool_calls(client, shared_server, tok):
    call = reply_ids(tok, "get_weather", CALL_CODE, "<|observation|>")
    observation = tok.special_token_ids["<|observation|>"]
    with scripted_replies(shared_server.engine, {"plain": call}):
        chunks = list(client.generate("hi", request_id="plain", stop_token_ids=[observation],
                                      max_tokens=len(call) + 5))
    assert chunks[-1].finish_reason == "stop" and chunks[-1].tool_call is None
