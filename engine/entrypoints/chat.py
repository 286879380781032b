"""Chat, for every frontend (the offline ``LLM.chat``, gRPC ``Chat``, and the HTTP API): ChatGLM3 prompts in, tool
calls out. The engine below knows nothing of chats: a chat becomes a prompt of token ids and plain sampling
parameters here, and a finished reply is read back as text or a tool call here.
"""
from __future__ import annotations

import dataclasses
import logging

from glmserve.engine.core.errors import RequestError
from glmserve.engine.core.outputs import CompletionOutput
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.structured.tool_call_grammar import ToolChoice, tool_call_output
from glmserve.engine.text.chat_format import ChatMessage, build_chat_prompt
from glmserve.engine.text.tokenizer import ChatGLMTokenizer
from glmserve.engine.text.tool_call import ToolCallParseError, parse_tool_call

log = logging.getLogger(__name__)


def with_tools(messages: list[ChatMessage], tools: list | dict | None) -> list[ChatMessage]:
    """The tools go on the first system message (an empty one is put first if there is none)."""
    if tools is None:
        return messages
    first_system = next((i for i, m in enumerate(messages) if m.role == "system"), None)
    if first_system is None:
        return [ChatMessage("system", "", tools=tools)] + messages
    messages = list(messages)
    messages[first_system] = dataclasses.replace(messages[first_system], tools=tools)
    return messages


class ChatTemplate:
    """ChatGLM3's chat format over one tokenizer."""

    def __init__(self, tokenizer: ChatGLMTokenizer):
        self.tokenizer = tokenizer
        self.observation_id = tokenizer.special_token_ids["<|observation|>"]

    def prompt(self, messages: list[ChatMessage], tools: list | dict | None = None) -> list[int]:
        return build_chat_prompt(self.tokenizer, with_tools(messages, tools))

    def sampling_params(self, params: SamplingParams, tools: list | dict | None = None,
                        tool_choice: ToolChoice | None = None) -> SamplingParams:
        """What a reply runs with: it ends on eos, <|user|> or <|observation|> (never on <|assistant|>), and its
        leading "\\n " is removed. With ``tool_choice`` "required" or a tool's name, the reply is constrained to a
        tool call whose arguments are valid for the tool (engine/structured); "auto" leaves it free."""
        extra = [t for t in self.tokenizer.chat_stop_token_ids if t not in params.stop_token_ids]
        changes: dict = dict(stop_token_ids=list(params.stop_token_ids) + extra, strip_reply_prefix=True)
        forced = tool_call_output(tools, tool_choice) if tool_choice is not None else None
        if forced is not None:
            if params.structured is not None:
                raise RequestError("tool_choice", "a forced tool call cannot be combined with structured output")
            changes["structured"] = forced
        return params.clone(**changes)

    def finish(self, sample: CompletionOutput, request_id: str = "") -> CompletionOutput:
        """A finished reply that stopped on <|observation|> and parses as a tool call becomes finish_reason
        "tool_call" with the call parsed (with ``ast``, never ``eval``); one that does not parse stays a plain
        "stop" with its text. Changes ``sample`` in place and returns it."""
        if sample.finish_reason == "stop" and sample.stop_reason == self.observation_id:
            try:
                sample.tool_call, sample.finish_reason = parse_tool_call(sample.text), "tool_call"
            except ToolCallParseError as exc:
                log.info("request %s stopped on <|observation|> without a valid tool call: %s", request_id, exc)
        return sample

