"""Log-probabilities in OpenAI's two shapes, with each token shown as text.

A token's text is its SentencePiece piece with the word-boundary mark as a space; a byte-fallback piece stands
for one byte: printable ASCII as that character, any other byte as ``bytes:\\xNN`` (OpenAI's convention for a
token that is not valid UTF-8 alone). Chat log-probs also give each token's exact ``bytes``.
"""
from __future__ import annotations

from glmserve.engine.text.tokenizer import ChatGLMTokenizer

WORD_MARK = "\u2581"   # SentencePiece's "▁"


class TokenText:
    """Token id -> (text, bytes), cached: a response shows the same few thousand tokens again and again."""

    def __init__(self, tokenizer: ChatGLMTokenizer):
        self._tok = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        found = self._cache.get(token_id)
        if found is None:
            found = self._cache[token_id] = self._describe(token_id)
        return found

    def _describe(self, token_id: int) -> tuple[str, list[int]]:
        value = self._tok.byte_value(token_id)
        if value is not None:
            text = chr(value) if 0x20 <= value < 0x7F or value in (0x09, 0x0A, 0x0D) else f"bytes:\\x{value:02x}"
            return text, [value]
        text = self._tok.id_to_piece(token_id).replace(WORD_MARK, " ")
        return text, list(text.encode("utf-8"))


def chat_logprobs(token_text: TokenText, token_ids: list[int], logprobs: list[float],
                  top: list[list[tuple[int, float]]], num_top: int) -> dict:
    """``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}, ...]}``."""
    content = []
    for token_id, logprob, alternatives in zip(token_ids, logprobs, top):
        text, raw = token_text(token_id)
        entry = {"token": text, "logprob": logprob, "bytes": raw, "top_logprobs": []}
        for alt_id, alt_logprob in (alternatives or ())[:num_top]:
            alt_text, alt_raw = token_text(alt_id)
            entry["top_logprobs"].append({"token": alt_text, "logprob": alt_logprob, "bytes": alt_raw})
        content.append(entry)
    return {"content": content}


def completion_logprobs(token_text: TokenText, token_ids: list[int], logprobs: list[float],
                        top: list[list[tuple[int, float]]], text_offset: int) -> tuple[dict, int]:
    """``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`` and the offset after the last token.

    ``text_offset`` counts characters of the tokens' texts, from ``text_offset`` on (the chunk's start)."""
    tokens, offsets, tops = [], [], []
    for token_id, alternatives in zip(token_ids, top):
        text, _ = token_text(token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        tops.append({token_text(alt_id)[0]: alt_logprob for alt_id, alt_logprob in alternatives or ()})
    return {"tokens": tokens, "token_logprobs": list(logprobs), "top_logprobs": tops,
            "text_offset": offsets}, text_offset
