"""A chat reply, when the model was given tools: plain text to stream, or a tool call to hold back.

OpenAI's clients expect a reply to be either ``content`` or ``tool_calls``, never the call's code as text. A
ChatGLM3 reply starts with its metadata line: empty for a plain answer (so the raw reply starts with ``"\\n"``),
the tool's name for a call. The chat runs without the engine's reply-prefix stripping, and this gate reads the
raw text: a plain answer streams at once, minus its leading ``"\\n "`` (exactly ``clean_reply``); anything else
is held until the reply ends, when ``ChatTemplate.finish`` has read it as a tool call, or as text after all.
A forced call (``tool_choice`` "required" or a function) runs with the prefix stripping, as its grammar is the chat
reply's; it starts with the tool's name, never ``"\n"``, so it is held whole all the same.
"""
from __future__ import annotations

from glmserve.engine.core.outputs import CompletionOutput
from glmserve.engine.text.chat_format import clean_reply


class ReplyGate:
    def __init__(self) -> None:
        self._held = ""
        self._plain: bool | None = None     # None: not decided yet

    @property
    def holding(self) -> bool:
        return self._plain is not True

    def feed(self, text: str) -> str:
        """The raw reply's next text; returns what can be sent now."""
        if self._plain:
            return text
        self._held += text
        if self._plain is None:
            if self._held in ("", "\n"):
                return ""                        # may still become "\n " + an answer
            self._plain = self._held.startswith("\n")
            if self._plain:
                text, self._held = clean_reply(self._held), ""
                return text
        return ""

    def finish(self, result: CompletionOutput) -> str:
        """At the end of the reply: the text still to send (none for a tool call)."""
        if self._plain or result.tool_call is not None:
            return ""
        text, self._held = clean_reply(self._held), ""
        return text
