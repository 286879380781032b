"""ChatGLM3 chat prompts: typed messages in, token ids out.

The prompt is built from ids, never from a rendered string: role tokens come only from ``message.role``, and
every text piece goes through SentencePiece alone, so content cannot forge a turn.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from glmserve.engine.text.tokenizer import ChatGLMTokenizer

ROLES = ("system", "user", "assistant", "observation")


class ChatFormatError(ValueError):
    """A message list that does not describe a ChatGLM3 conversation."""


@dataclass(frozen=True)
class ChatMessage:
    """One turn. ``metadata`` is the text after the role token on the same line (a tool name for a tool call,
    ``interpreter`` for code); ``tools`` (system messages only) are the tool descriptions shown to the model."""

    role: str
    content: str
    metadata: str = ""
    tools: list | dict | None = None

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ChatFormatError(f"unknown chat role {self.role!r} (expected one of {', '.join(ROLES)})")
        for name in ("content", "metadata"):
            if not isinstance(getattr(self, name), str):
                raise ChatFormatError(f"{self.role} message: {name} must be a string, "
                                      f"got {type(getattr(self, name)).__name__}")
        if self.tools is not None:
            if not isinstance(self.tools, (list, dict)):
                raise ChatFormatError(f"tools must be a list or an object, got {type(self.tools).__name__}")
            if self.role != "system":
                raise ChatFormatError(f"tools belong on the system message, not on a {self.role} message")

    @property
    def prompt_text(self) -> str:
        """The content as the model sees it: a system message lists its tools after the content."""
        if self.tools is None:
            return self.content
        return self.content + "\n" + json.dumps(self.tools, indent=4, ensure_ascii=False)


def build_chat_prompt(tokenizer: ChatGLMTokenizer, messages: list[ChatMessage],
                      add_generation_prompt: bool = True) -> list[int]:
    """``[gMASK] sop``, then per message ``<|role|>`` + encode(metadata + "\\n") + encode(prompt_text), then
    ``<|assistant|>`` when the model is to reply.

    Metadata and text are encoded separately (each gets its own dummy-prefix space, as in the reference) and no
    separator goes between messages.
    """
    special = tokenizer.special_token_ids
    ids = tokenizer.prefix_token_ids
    for message in messages:
        ids.append(special[f"<|{message.role}|>"])
        ids += tokenizer.encode(message.metadata + "\n", add_special_tokens=False)
        ids += tokenizer.encode(message.prompt_text, add_special_tokens=False)
    if add_generation_prompt:
        ids.append(special["<|assistant|>"])
    return ids


def clean_reply(text: str) -> str:
    """A plain reply without the ``"\\n "`` it decodes with.

    After ``<|assistant|>`` the model writes the metadata line (empty for a plain answer) and its ``"\\n"``, then
    the content, whose first piece carries the dummy-prefix space. Only that prefix is removed: the reference's
    full ``strip()`` would also eat intended indentation and trailing text a stream has already sent. A tool-call
    reply starts with its tool name and is returned unchanged.
    """
    if text.startswith("\n "):
        return text[2:]
    if text.startswith("\n"):
        return text[1:]
    return text


_MESSAGE_KEYS = {"role", "content", "metadata", "tools"}


def messages_from_json(obj: Any) -> list[ChatMessage]:
    """Messages from parsed JSON: a list of ``{"role", "content", "metadata"?, "tools"?}`` objects."""
    if not isinstance(obj, list):
        raise ChatFormatError(f"a chat must be a JSON list of messages, got {type(obj).__name__}")
    if not obj:
        raise ChatFormatError("a chat needs at least one message")
    messages = []
    for i, item in enumerate(obj):
        if not isinstance(item, dict):
            raise ChatFormatError(f"message {i}: expected an object, got {type(item).__name__}")
        missing = sorted({"role", "content"} - item.keys())
        if missing:
            raise ChatFormatError(f"message {i}: missing {' and '.join(missing)}")
        unknown = sorted(item.keys() - _MESSAGE_KEYS)
        if unknown:
            raise ChatFormatError(f"message {i}: unexpected key(s) {', '.join(map(repr, unknown))}")
        try:
            messages.append(ChatMessage(**item))
        except ChatFormatError as exc:
            raise ChatFormatError(f"message {i}: {exc}") from None
    return messages
