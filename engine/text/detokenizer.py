"""Streaming decode: text deltas whose concatenation equals ``tokenizer.decode`` of the same ids.

Two things keep a naive per-token decode from matching the full decode:

* byte-fallback pieces: a character may arrive as 2-4 byte tokens, and decoding a prefix of them gives U+FFFD.
  Trailing bytes that could still become a character are held back until they complete (or cannot).
* SentencePiece drops the dummy-prefix space of the first piece of each decode call, and when exactly it stops
  doing so differs between SentencePiece versions. Until a segment has produced text, its ids are decoded from
  the segment's start (exact by definition); after that, new ids are decoded behind an anchor piece ("\\n") that
  has already produced text, which puts SentencePiece in the same mid-text state, and the anchor's text is cut off.

Each step decodes at most a few ids, so the cost per token does not grow with the sequence.
"""
from __future__ import annotations

from glmserve.engine.text.chat_format import clean_reply
from glmserve.engine.text.tokenizer import ChatGLMTokenizer

_ANCHOR_BYTE = 0x0A  # a complete one-byte character: it never joins with the bytes after it


def _incomplete_tail(byte_values: list[int]) -> int:
    """How many trailing bytes are the unfinished start of a UTF-8 character (0 when none are).

    Judged on structure only (lead byte plus continuation bytes), so a validator as strict or as lax as
    SentencePiece's can never see a complete character where this sees an unfinished one.
    """
    n_cont = 0
    for value in reversed(byte_values[-4:]):
        if 0x80 <= value < 0xC0:
            n_cont += 1
            continue
        needed = 2 if 0xC0 <= value < 0xE0 else 3 if 0xE0 <= value < 0xF0 else 4 if 0xF0 <= value < 0xF8 else 0
        return n_cont + 1 if n_cont + 1 < needed else 0
    return 0


class IncrementalDetokenizer:
    """Feed ids one by one with :meth:`add`; call :meth:`flush` when the sequence ends.

    ``strip_reply_prefix`` makes the stream equal ``clean_reply(decode(ids))``: the first characters are held
    until it is clear whether they are the reply's leading ``"\\n "``.
    """

    def __init__(self, tokenizer: ChatGLMTokenizer, skip_special_tokens: bool = True,
                 strip_reply_prefix: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special_tokens
        self._anchor = tokenizer.byte_token_id(_ANCHOR_BYTE)
        self._pending: list[int] = []     # ids of the current segment not yet turned into final text
        self._segment_has_text = False    # once true, pending ids are decoded behind the anchor
        self._head: str | None = "" if strip_reply_prefix else None  # text held while the prefix is undecided
        self._parts: list[str] = []
        self._finished = False

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._parts)

    def add(self, token_id: int) -> str:
        """Take one id; return the text that became final with it (often empty)."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.add() after flush()")
        token_id = self._tok.check_id(token_id)
        if self._tok.is_special(token_id):
            text = self._decode_ready(len(self._pending))
            self._pending.clear()
            self._segment_has_text = False  # the next segment's first piece loses its dummy-prefix space again
            if not self._skip_special:
                text += self._tok.id_to_piece(token_id)
            return self._emit(text)
        self._pending.append(token_id)
        hold = 0
        if self._tok.byte_value(token_id) is not None:
            hold = _incomplete_tail(self._trailing_bytes())
        return self._emit(self._decode_ready(len(self._pending) - hold))

    def flush(self) -> str:
        """End of sequence: release held bytes (as U+FFFD, like the full decode) and any held prefix."""
        if self._finished:
            return ""
        self._finished = True
        text = self._decode_ready(len(self._pending))
        self._pending.clear()
        return self._emit(text)

    def _trailing_bytes(self) -> list[int]:
        values: list[int] = []
        for token_id in reversed(self._pending[-4:]):
            value = self._tok.byte_value(token_id)
            if value is None:
                break
            values.append(value)
        return values[::-1]

    def _decode_ready(self, n_ready: int) -> str:
        """Decode the first ``n_ready`` pending ids if that yields final text; keep the rest pending."""
        if n_ready <= 0:
            return ""
        ready = self._pending[:n_ready]
        if self._segment_has_text:
            text = self._tok.decode([self._anchor] + ready)[1:]
        else:
            text = self._tok.decode(ready)
            if not text:
                return ""  # still at the segment start: keep these ids so they are decoded from there again
            self._segment_has_text = True
        del self._pending[:n_ready]
        return text

    def _emit(self, text: str) -> str:
        if self._head is not None:
            self._head += text
            if self._head in ("", "\n") and not self._finished:
                return ""  # may still be the start of "\n "
            text, self._head = clean_reply(self._head), None
        if text:
            self._parts.append(text)
        return text
