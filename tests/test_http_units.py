"""Pieces of the HTTP API on their own: the reply gate, prompt shapes, error field paths, token texts."""
from __future__ import annotations

import pytest

from glmserve.engine.core.outputs import CompletionOutput
from glmserve.engine.entrypoints.http.app import field_path
from glmserve.engine.entrypoints.http.completions_api import prompt_token_ids
from glmserve.engine.entrypoints.http.errors import ApiError
from glmserve.engine.entrypoints.http.logprobs import TokenText
from glmserve.engine.entrypoints.http.reply_gate import ReplyGate
from glmserve.engine.text.chat_format import clean_reply
from glmserve.engine.text.tokenizer import ChatGLMTokenizer, embedded_tokenizer_path
from glmserve.engine.text.tool_call import ToolCall


@pytest.fixture(scope="module")
def tok() -> ChatGLMTokenizer:
    return ChatGLMTokenizer.from_file(embedded_tokenizer_path())


def gate_run(pieces: list[str], tool_call: ToolCall | None = None) -> tuple[list[str], str]:
    gate = ReplyGate()
    sent = [gate.feed(p) for p in pieces]
    last = gate.finish(CompletionOutput(0, "".join(pieces), finish_reason="stop", tool_call=tool_call))
    return sent, last


@pytest.mark.parametrize("pieces", [["\n", " Hello", " world"], ["\n Hel", "lo"], ["\n", "", " x"], ["\n"], [""],
                                    ["\nNo space"], ["get_weather\n", "```python\nx\n```"], ["plain start"]])
def test_the_gate_sends_exactly_clean_reply(pieces):
    sent, last = gate_run(pieces)
    assert "".join(sent) + last == clean_reply("".join(pieces))


def test_the_gate_streams_plain_replies_and_holds_calls():
    sent, last = gate_run(["\n", " It", " is", " sunny"])
    assert sent == ["", "It", " is", " sunny"] and last == ""
    sent, last = gate_run(["get_weather\n", "```python\n", "tool_call(a=1)\n```"], ToolCall("get_weather", {"a": 1}))
    assert sent == ["", "", ""] and last == ""      # a call is never sent as text


def test_prompt_shapes(tok):
    assert prompt_token_ids("hi", tok) == [("prompt", tok.encode("hi"))]
    assert prompt_token_ids(["a", "b"], tok) == [("prompt[0]", tok.encode("a")), ("prompt[1]", tok.encode("b"))]
    assert prompt_token_ids([5, 6], tok) == [("prompt", [5, 6])]
    assert prompt_token_ids([[5], [6, 7]], tok) == [("prompt[0]", [5]), ("prompt[1]", [6, 7])]
    for bad, param in [(3, "prompt"), ({"a": 1}, "prompt"), ([[5], []], "prompt[1]"), ([[5], ["x"]], "prompt[1]"),
                       ([1.5], "prompt"), (None, "prompt")]:
        with pytest.raises(ApiError) as info:
            prompt_token_ids(bad, tok)
        assert info.value.status == 400 and info.value.param == param


def test_field_paths():
    assert field_path(("body", "messages", 0, "role")) == "messages[0].role"
    assert field_path(("body", "stop", "list[str]", 1)) == "stop[1]"
    assert field_path(("body", "temperature")) == "temperature"
    assert field_path(("body",)) is None


def test_token_texts(tok):
    text = TokenText(tok)
    newline = tok.byte_token_id(0x0A)
    assert text(newline) == ("\n", [0x0A])
    assert text(tok.byte_token_id(0xE4)) == ("bytes:\\xe4", [0xE4])
    piece_id = tok.encode("hello", add_special_tokens=False)[0]
    shown, raw = text(piece_id)
    assert shown == tok.id_to_piece(piece_id).replace("\u2581", " ") and bytes(raw).decode() == shown
    assert text(tok.eos_token_id)[0] == tok.id_to_piece(tok.eos_token_id)
