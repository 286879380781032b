"""``POST /v1/chat/completions``: OpenAI's chat in, ChatGLM3's prompt through ``ChatTemplate``, OpenAI's answer out.

Messages map to ChatGLM3 turns: ``system`` (and OpenAI's newer ``developer``), ``user`` and ``assistant`` keep
their roles; a ``tool`` message is an ``observation``; an assistant message's ``tool_calls`` are written as
ChatGLM3 writes a call (the tool's name on the metadata line, then ``tool_call(...)`` in a fenced block), so a
conversation continues exactly as the model would have produced it. ``tools`` become ChatGLM3's tools system
prompt; a reply that is a tool call comes back as ``tool_calls`` with ``finish_reason: "tool_calls"``.
``tool_choice`` "required" or a named function constrains the reply to a call (through ``ChatTemplate``), and
``response_format`` (or vLLM's structured outputs) constrains the reply's content.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator

from glmserve.engine.core.outputs import CompletionOutput
from glmserve.engine.entrypoints.http.errors import bad_request
from glmserve.engine.entrypoints.http.generation import ChoiceDelta, EnginePrompt, Generation
from glmserve.engine.entrypoints.http.logprobs import TokenText, chat_logprobs
from glmserve.engine.entrypoints.http.protocol import ChatCompletionRequest, Message, Tool, ToolCallIn
from glmserve.engine.entrypoints.http.reply_gate import ReplyGate
from glmserve.engine.entrypoints.http.sampling import include_usage, sampling_params
from glmserve.engine.entrypoints.http.streaming import answer_events, sse
from glmserve.engine.entrypoints.http.structured import field_names as structured_field_names
from glmserve.engine.entrypoints.serving_state import ServingState
from glmserve.engine.structured.tool_call_grammar import ToolChoice
from glmserve.engine.text.chat_format import ChatFormatError, ChatMessage
from glmserve.engine.text.tool_call import ToolCall

FINISH_REASONS = {"stop": "stop", "length": "length", "tool_call": "tool_calls", "abort": "abort"}
FENCE = "```"


# ---- request in ---------------------------------------------------------------------------------------------------
def chat_messages(messages: list[Message]) -> list[ChatMessage]:
    if not messages:
        raise bad_request("messages", "messages: a chat needs at least one message")
    result = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        text = _text(m, where)
        if m.role in ("system", "developer"):
            result.append(ChatMessage("system", text))
        elif m.role == "user":
            result.append(ChatMessage("user", text))
        elif m.role == "tool":
            result.append(ChatMessage("observation", text))
        else:
            if text or not m.tool_calls:
                result.append(ChatMessage("assistant", text))
            for j, call in enumerate(m.tool_calls or []):
                result.append(tool_call_message(call, f"{where}.tool_calls[{j}]"))
    return result


def _text(m: Message, where: str) -> str:
    if m.content is None:
        if m.role == "assistant" and m.tool_calls:
            return ""
        raise bad_request(f"{where}.content", f"{where}.content: a {m.role} message needs content")
    if isinstance(m.content, str):
        return m.content
    parts = []
    for j, part in enumerate(m.content):
        if part.type != "text" or part.text is None:
            raise bad_request(f"{where}.content[{j}]", f"{where}.content[{j}]: only text parts are supported "
                              f"(ChatGLM3 reads text), got type {part.type!r}")
        parts.append(part.text)
    return "".join(parts)


def tool_call_message(call: ToolCallIn, where: str) -> ChatMessage:
    """An earlier tool call, as ChatGLM3 writes one: ``<|assistant|>name\\n```python\\ntool_call(k=v, ...)\\n```."""
    try:
        arguments = json.loads(call.function.arguments)
    except ValueError as exc:
        raise bad_request(f"{where}.function.arguments",
                          f"{where}.function.arguments: not valid JSON: {exc}") from None
    if not isinstance(arguments, dict):
        raise bad_request(f"{where}.function.arguments", f"{where}.function.arguments: must be a JSON object")
    bad = next((k for k in arguments if not k.isidentifier()), None)
    if bad is not None:
        raise bad_request(f"{where}.function.arguments",
                          f"{where}.function.arguments: {bad!r} cannot be a keyword argument of tool_call")
    if not call.function.name or "\n" in call.function.name:
        raise bad_request(f"{where}.function.name", f"{where}.function.name: must be one non-empty line")
    # repr() writes each JSON value as the Python literal that the tool-call parser reads back.
    code = "tool_call(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")"
    return ChatMessage("assistant", f"{FENCE}python\n{code}\n{FENCE}", metadata=call.function.name)


def chat_tools(tools: list[Tool] | None, tool_choice: str | dict | None = None) -> list | None:
    """ChatGLM3's tools (the function definitions, shown to the model as JSON), or None for no tools."""
    if not tools or tool_choice == "none":
        return None
    return [tool.function.model_dump(exclude_none=True) for tool in tools]


def chat_tool_choice(tool_choice: str | dict | None) -> ToolChoice:
    """OpenAI's ``tool_choice`` as the chat layer takes it: "auto" (and "none", whose tools stay out of the prompt)
    leave the reply free; "required" and ``{"type": "function", "function": {"name": ...}}`` force a call."""
    if tool_choice in (None, "auto", "none"):
        return ToolChoice()
    if tool_choice == "required":
        return ToolChoice("required")
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if tool_choice.get("type") == "function" and isinstance(function, dict) and isinstance(function.get("name"),
                                                                                              str):
            return ToolChoice.named(function["name"])
        raise bad_request("tool_choice", 'tool_choice: a function is chosen as {"type": "function", "function": '
                          f'{{"name": ...}}}}, got {tool_choice!r}')
    raise bad_request("tool_choice", "tool_choice: must be 'none', 'auto', 'required' or a function, got "
                      f"{tool_choice!r}")


@dataclass
class ChatCall:
    """One chat completion: its generation and how its answer is written."""

    generation: Generation
    response_id: str
    model: str
    token_text: TokenText
    num_top_logprobs: int | None       # None: no log-probs
    include_usage: bool
    return_token_ids: bool
    gates: list[ReplyGate] | None      # with tools: one per choice
    created: int = field(default_factory=lambda: int(time.time()))


def chat_call(body: ChatCompletionRequest, state: ServingState, request_id: str, model: str,
              token_text: TokenText, adapter: str | None = None) -> ChatCall:
    """Everything checked that can be checked before the engine sees the request."""
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs", "top_logprobs: needs logprobs: true")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    chat = state.chat
    tools = chat_tools(body.tools, body.tool_choice)
    params = chat.sampling_params(sampling_params(body, max_tokens, logprobs), tools,
                                  chat_tool_choice(body.tool_choice))
    # With tools, a reply may be a call: a gate per choice keeps a call's code out of the text (see reply_gate).
    # A free reply is read raw, to tell a call from an answer by its first line. A forced call keeps the chat's
    # prefix stripping (its grammar is the chat reply's) and is held whole. A reply constrained to some other
    # grammar cannot be a call and needs no gate.
    structured = params.structured
    free_with_tools = tools is not None and structured is None
    forced_call = structured is not None and structured.kind == "tool_call"
    if free_with_tools:
        params = params.clone(strip_reply_prefix=False)
    try:
        prompt = chat.prompt(chat_messages(body.messages), tools)
    except ChatFormatError as exc:
        raise bad_request("messages", f"messages: {exc}") from None
    generation = Generation(state.engine, [EnginePrompt(request_id, prompt, "messages")], params,
                            body.priority or 0, adapter, finish=chat.finish)
    return ChatCall(generation, f"chatcmpl-{request_id}", model, token_text, logprobs, include_usage(body),
                    bool(body.return_token_ids),
                    [ReplyGate() for _ in range(params.n)] if free_with_tools or forced_call else None)


def field_names(body: ChatCompletionRequest) -> dict[str, str]:
    """The engine's field names as this request spells them, for error messages."""
    names = {"prompt": "messages", "logprobs": "top_logprobs", **structured_field_names(body)}
    if body.max_completion_tokens is not None:
        names["max_tokens"] = "max_completion_tokens"
    return names


# ---- answer out ---------------------------------------------------------------------------------------------------
def tool_call_json(call: ToolCall) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def _logprobs(call: ChatCall, sample: CompletionOutput) -> dict | None:
    if call.num_top_logprobs is None or sample.logprobs is None:
        return None
    return chat_logprobs(call.token_text, sample.token_ids, sample.logprobs, sample.top_logprobs or [],
                         call.num_top_logprobs)


async def complete(call: ChatCall) -> dict:
    """The whole answer (``stream: false``)."""
    async for _ in call.generation.choices():
        pass
    choices = []
    for index, result in enumerate(call.generation.results()):
        text = result.text
        if call.gates is not None:
            gate = call.gates[index]
            text = gate.feed(text) + gate.finish(result)
        message: dict = {"role": "assistant", "content": text}
        if result.tool_call is not None:
            message = {"role": "assistant", "content": None, "tool_calls": [tool_call_json(result.tool_call)]}
        choice = {"index": index, "message": message, "logprobs": _logprobs(call, result),
                  "finish_reason": FINISH_REASONS[result.finish_reason]}
        if call.return_token_ids:
            choice["token_ids"] = result.token_ids
        choices.append(choice)
    return {"id": call.response_id, "object": "chat.completion", "created": call.created, "model": call.model,
            "choices": choices, "usage": call.generation.usage().to_json()}


async def stream(call: ChatCall) -> AsyncIterator[bytes]:
    """``chat.completion.chunk`` events (``stream: true``): each choice's role first, then its text as it comes,
    then its finish reason; with ``include_usage`` a last chunk with the usage and no choices."""
    base = {"id": call.response_id, "object": "chat.completion.chunk", "created": call.created, "model": call.model}
    if call.include_usage:
        base["usage"] = None

    def chunk(choice: dict) -> bytes:
        return sse({**base, "choices": [choice]})

    for index in range(call.generation.n):
        yield chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                     "finish_reason": None})
    held_logprobs: dict[int, list[CompletionOutput]] = {}

    async def choices() -> AsyncIterator[bytes]:
        async for batch in call.generation.choices():
            for choice_delta in batch:
                choice = _stream_choice(call, choice_delta, held_logprobs)
                if choice is not None:
                    yield chunk(choice)
    def usage() -> dict:
        return {**base, "choices": [], "usage": call.generation.usage().to_json()}
    async for event in answer_events(choices(), usage if call.include_usage else None):
        yield event


def _stream_choice(call: ChatCall, d: ChoiceDelta, held: dict[int, list[CompletionOutput]]) -> dict | None:
    sample, text, logprobs = d.delta, d.delta.text, _logprobs(call, d.delta)
    gate = call.gates[d.index] if call.gates is not None else None
    if gate is not None:
        text = gate.feed(text)
        if call.num_top_logprobs is not None:   # held text's log-probs go out with the text
            if gate.holding:
                held.setdefault(d.index, []).append(sample)
                logprobs = None
            elif d.index in held:
                logprobs = _joined_logprobs(call, held.pop(d.index) + [sample])
    delta: dict = {}
    finish = None
    if d.result is not None:
        finish = FINISH_REASONS[d.result.finish_reason]
        if gate is not None:
            text += gate.finish(d.result)
            if d.index in held:
                logprobs = _joined_logprobs(call, held.pop(d.index))
        if d.result.tool_call is not None:
            delta["tool_calls"] = [{"index": 0, **tool_call_json(d.result.tool_call)}]
    if text:
        delta["content"] = text
    if not delta and finish is None and logprobs is None and not (call.return_token_ids and sample.token_ids):
        return None   # nothing to tell (text held back by the detokenizer or the gate)
    choice = {"index": d.index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    if call.return_token_ids:
        choice["token_ids"] = sample.token_ids
    return choice


def _joined_logprobs(call: ChatCall, parts: list[CompletionOutput]) -> dict | None:
    joined = CompletionOutput(parts[0].index)
    for part in parts:
        joined.extend(part)
    return _logprobs(call, joined)
