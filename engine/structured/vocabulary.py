"""The ChatGLM3 vocabulary as the grammar engine must read it.

xgrammar reads a byte-fallback SentencePiece vocabulary as its pieces: "▁" is a space and "<0xNN>" is one byte, so
"▁{" is " {" and a character may be spelled in 2-4 byte pieces. An id given as "" is a special token to it, never
allowed inside constrained text; that is what <unk>, <s>, the nine ChatGLM3 special tokens and eos become (eos
is xgrammar's one stop token: allowed only where the grammar is complete). Ids from the tokenizer's size up to the
model's padded vocabulary (64798..65023 for ChatGLM3) are embedding padding, which xgrammar never allows either.

One thing xgrammar cannot know: SentencePiece drops the dummy-prefix space of the first piece of a decode, so a
completion that starts with "▁{" reaches the client as "{" while xgrammar matched " {". The first token of a
constrained completion is therefore kept off pieces that start with "▁" (``no_leading_space``), which makes the
text the client receives exactly the text the grammar matched.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glmserve.engine.text.tokenizer import ChatGLMTokenizer

SPACE_PIECE = "\u2581"   # SentencePiece's "▁"


@dataclass(frozen=True)
class GrammarVocabulary:
    encoded: list[str]              # per tokenizer id: its piece, or "" for ids that are never text
    width: int                      # logits columns: the model's padded vocabulary (bitmask rows cover it)
    eos_token_id: int
    num_text_ids: int               # the tokenizer's vocabulary (pieces and special tokens)
    no_leading_space: np.ndarray    # uint32 [words]: every bit set except those of pieces starting with "▁"

    @property
    def words(self) -> int:
        """int32 words of one bitmask row."""
        return -(-self.width // 32)

    def is_text(self, token_id: int) -> bool:
        return 0 <= token_id < self.num_text_ids and self.encoded[token_id] != ""


def grammar_vocabulary(tokenizer: ChatGLMTokenizer, width: int) -> GrammarVocabulary:
    if width < tokenizer.vocab_size:
        raise ValueError(f"logits width {width} is narrower than the tokenizer's {tokenizer.vocab_size} ids")
    encoded = [piece or "" for piece in tokenizer.text_pieces()]
    encoded[tokenizer.eos_token_id] = ""
    words = -(-width // 32)
    starts_with_space = np.zeros(words * 32, dtype=bool)
    starts_with_space[:len(encoded)] = [piece.startswith(SPACE_PIECE) for piece in encoded]
    # Bit j of word w is id 32 * w + j (xgrammar's layout): pack little-endian bit order into uint32 words.
    packed = np.packbits(~starts_with_space, bitorder="little").view(np.uint32)
    return GrammarVocabulary(encoded, width, tokenizer.eos_token_id, tokenizer.vocab_size, packed)


def tokenizer_info(vocab: GrammarVocabulary):
    """xgrammar's TokenizerInfo for the vocabulary (imported here: xgrammar loads only once it is needed)."""
    import xgrammar as xgr

    return xgr.TokenizerInfo(vocab.encoded, xgr.VocabType.BYTE_FALLBACK, vocab_size=vocab.width,
                             stop_token_ids=[vocab.eos_token_id], add_prefix_space=True)
