"""Streaming decode equals the full decode, never shows half a character, and stays O(1) per token."""
from __future__ import annotations

import random

import pytest

from glmserve.engine.text.chat_format import ChatMessage, build_chat_prompt, clean_reply
from glmserve.engine.text.detokenizer import IncrementalDetokenizer
from glmserve.engine.text.tokenizer import ChatGLMTokenizer, TokenizerError, embedded_tokenizer_path

REPLACEMENT = "\ufffd"
TEXTS = [
    "你好👋！我是人工智能助手 ChatGLM3-6B，很高兴见到你，欢迎问我任何问题。",
    "Rare characters fall back to bytes: 龘 𠀀 𪚥 and emoji 🦖🦕 👨‍👩‍👧 🇨🇳 🏳️‍🌈",
    "ทดสอบ ภาษาไทย, Ελληνικά, русский, 한국어,日本語のテキスト",
    "\n  leading newline and spaces, trailing too  \n\n",
    "def f(x):\n    return {'a': [1, 2, 3]}  # ✅\n",
]


def stream(tok: ChatGLMTokenizer, ids: list[int], **kwargs) -> list[str]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = [detok.add(i) for i in ids] + [detok.flush()]
    assert detok.text == "".join(deltas)
    return deltas


def expected(tok: ChatGLMTokenizer, ids: list[int], skip_special_tokens=True, strip_reply_prefix=False) -> str:
    text = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    return clean_reply(text) if strip_reply_prefix else text


OPTIONS = [dict(), dict(skip_special_tokens=False), dict(strip_reply_prefix=True)]


# ---- the official decode case -------------------------------------------------------------------------------
def test_golden_reply_streams_to_the_official_text(real_tokenizer, chatglm3_golden):
    case = chatglm3_golden["decode"][0]
    raw = stream(real_tokenizer, case["token_ids"])
    assert "".join(raw) == case["raw_text"]
    clean = stream(real_tokenizer, case["token_ids"], strip_reply_prefix=True)
    assert "".join(clean) == case["response_text"]
    assert not any(REPLACEMENT in d for d in raw + clean)
    assert "👋" in clean  # its four byte pieces come out as one delta


# ---- equality with the full decode, no U+FFFD for valid text ------------------------------------------------
@pytest.mark.parametrize("fixture", ["real_tokenizer", "tiny_tokenizer"])
@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "specials", "reply"])
def test_stream_equals_decode(fixture, text, options, request):
    tok: ChatGLMTokenizer = request.getfixturevalue(fixture)
    ids = tok.encode(text)
    deltas = stream(tok, ids, **options)
    assert "".join(deltas) == expected(tok, ids, **options)
    assert not any(REPLACEMENT in d for d in deltas)


@pytest.mark.parametrize("fixture", ["real_tokenizer", "tiny_tokenizer"])
@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "specials", "reply"])
def test_stream_across_special_tokens(fixture, options, request):
    tok: ChatGLMTokenizer = request.getfixturevalue(fixture)
    prompt = build_chat_prompt(tok, [ChatMessage("system", "🦖 only"), ChatMessage("user", "龘\n"),
                                     ChatMessage("assistant", "ok 👍", metadata="meta")])
    reply = tok.encode("\n", add_special_tokens=False) + tok.encode("答案是 42 🦕", add_special_tokens=False)
    for ids in (prompt, reply, reply + [tok.special_token_ids["<|user|>"]], prompt + reply + [tok.eos_token_id]):
        assert "".join(stream(tok, ids, **options)) == expected(tok, ids, **options)


def test_bytes_are_held_until_the_character_completes(tiny_tokenizer):
    ids = tiny_tokenizer.encode("a🦖", add_special_tokens=False)
    byte_ids = [i for i in ids if tiny_tokenizer.byte_value(i) is not None]
    assert len(byte_ids) == 4
    detok = IncrementalDetokenizer(tiny_tokenizer)
    deltas = [detok.add(i) for i in ids]
    assert deltas[-4:] == ["", "", "", "🦖"]


def test_reply_prefix_is_held_until_decided(tiny_tokenizer):
    detok = IncrementalDetokenizer(tiny_tokenizer, strip_reply_prefix=True)
    newline = tiny_tokenizer.byte_token_id(0x0A)
    assert detok.add(newline) == ""  # could still be the start of "\n "
    assert detok.flush() == ""
    detok = IncrementalDetokenizer(tiny_tokenizer, strip_reply_prefix=True)
    assert detok.add(tiny_tokenizer.encode("H", add_special_tokens=False)[-1]) == "H"  # not a newline: released at once


# ---- invalid byte sequences decode like the full decode ----------------------------------------------------
@pytest.mark.parametrize("byte_values", [
    [0xF0, 0x9F, 0xA6],             # truncated at the end: U+FFFD only once the stream ends
    [0x80, 0x41, 0xBF],             # stray continuation bytes
    [0xE9, 0x41, 0xE9, 0xBE],       # a lead byte interrupted by ASCII
    [0xC0, 0x80, 0xF8, 0xFF],       # never valid in UTF-8
    [0xF0, 0x9F, 0xA6, 0x96, 0x96],  # a complete emoji and one extra continuation byte
])
def test_invalid_bytes_match_decode(tiny_tokenizer, byte_values):
    ids = tiny_tokenizer.encode("x", add_special_tokens=False) + [tiny_tokenizer.byte_token_id(b) for b in byte_values]
    for tail in ([], tiny_tokenizer.encode("y", add_special_tokens=False), [tiny_tokenizer.special_token_ids["eop"]]):
        for options in OPTIONS:
            assert "".join(stream(tiny_tokenizer, ids + tail, **options)) == expected(tiny_tokenizer, ids + tail, **options)


def test_truncated_character_is_not_shown_before_the_end(tiny_tokenizer):
    ids = tiny_tokenizer.encode("x", add_special_tokens=False) + [tiny_tokenizer.byte_token_id(b) for b in (0xF0, 0x9F, 0xA6)]
    detok = IncrementalDetokenizer(tiny_tokenizer)
    assert REPLACEMENT not in "".join(detok.add(i) for i in ids)
    assert detok.flush() == REPLACEMENT * 3  # as sentencepiece decodes each dangling byte


def test_random_sequences_match_decode(tiny_tokenizer):
    """Random ids, biased toward byte pieces, the ▁ piece and special/control ids, where decoding is subtle."""
    rng = random.Random(1234)
    n = tiny_tokenizer.vocab_size
    space = tiny_tokenizer.encode(" ", add_special_tokens=False)
    pools = [list(range(3, 259)), list(range(259, n - 9)), list(range(n - 9, n)), [0, 1, 2], space]
    for _ in range(300):
        ids = [rng.choice(rng.choices(pools, weights=[6, 6, 1, 1, 2])[0]) for _ in range(rng.randint(0, 30))]
        for options in OPTIONS:
            assert "".join(stream(tiny_tokenizer, ids, **options)) == expected(tiny_tokenizer, ids, **options), ids


# ---- cost and misuse ----------------------------------------------------------------------------------------
class CountingTokenizer(ChatGLMTokenizer):
    """Records the longest id list any decode call saw."""

    longest = 0

    def decode(self, ids, skip_special_tokens=True):
        ids = list(ids)
        CountingTokenizer.longest = max(CountingTokenizer.longest, len(ids))
        return super().decode(ids, skip_special_tokens)


def test_each_step_decodes_only_a_few_ids(tiny_tokenizer):
    counting = CountingTokenizer.from_file(embedded_tokenizer_path())
    ids = counting.encode(" ".join(TEXTS) * 20)
    assert len(ids) > 2000
    text = "".join(stream(counting, ids))
    assert CountingTokenizer.longest <= 5
    assert text == tiny_tokenizer.decode(ids)


def test_add_after_flush_is_an_error(tiny_tokenizer):
    detok = IncrementalDetokenizer(tiny_tokenizer)
    detok.add(100)
    detok.flush()
    assert detok.flush() == ""
    with pytest.raises(RuntimeError):
        detok.add(100)


def test_ids_outside_vocabulary_are_refused(tiny_tokenizer):
    detok = IncrementalDetokenizer(tiny_tokenizer)
    with pytest.raises(TokenizerError, match="token id 2009 "):
        detok.add(tiny_tokenizer.vocab_size)
