"""The ChatGLM3 tokenizer: a SentencePiece model plus nine special tokens appended after its pieces.

Only SentencePiece ever turns text into ids, and it knows nothing of the special tokens, so text can never
produce a special id ("<|user|>" typed by a user encodes as plain pieces). Special ids are added by code only:
the ``[gMASK] sop`` prefix here and the role tokens in ``chat_format``.
"""
from __future__ import annotations

import operator
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

# In this order, with ids sp.vocab_size() + i (64789.. for ChatGLM3).
SPECIAL_TOKENS: tuple[str, ...] = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)
# The ChatGLM3 piece layout every tokenizer here must have: <unk> (also pad), <s>, </s>, then 256 byte pieces.
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3  # <0x00> .. <0xFF> are ids 3..258 (so "\n" is 13)
# ChatGLM3's model is about 1 MB; anything far larger is a wrong path (a weights file), not worth reading whole.
MAX_MODEL_BYTES = 64 << 20


class TokenizerError(ValueError):
    """A tokenizer file that cannot be used, or an id outside the vocabulary."""


def embedded_tokenizer_path() -> str:
    """The tiny SentencePiece model shipped with the package (demos, tests, dummy-weight presets)."""
    return str(Path(__file__).resolve().parent / "assets" / "tiny_tokenizer.model")


class ChatGLMTokenizer:
    """ChatGLM3 tokenizer over a loaded SentencePiece model; build it with :meth:`from_file`."""

    def __init__(self, sp: spm.SentencePieceProcessor, path: str):
        self._sp = sp
        self.path = path
        self._num_pieces = sp.vocab_size()
        self._special_ids = {name: self._num_pieces + i for i, name in enumerate(SPECIAL_TOKENS)}

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> ChatGLMTokenizer:
        """Load a ``tokenizer.model``; any unusable file raises :class:`TokenizerError` naming the path."""
        path = os.fspath(path)
        try:
            if Path(path).stat().st_size > MAX_MODEL_BYTES:
                raise TokenizerError(f"{path} is too large to be a SentencePiece model")
            data = Path(path).read_bytes()
        except OSError as exc:
            raise TokenizerError(f"cannot read tokenizer file {path}: {exc.strerror or exc}") from None
        try:
            sp = spm.SentencePieceProcessor(model_proto=data)
        except RuntimeError:
            raise TokenizerError(f"not a SentencePiece model: {path}") from None
        _check_layout(sp, path)
        return cls(sp, path)

    # ---- vocabulary -----------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """SentencePiece pieces plus the nine special tokens (ids at or above it are embedding padding)."""
        return self._num_pieces + len(SPECIAL_TOKENS)

    @property
    def eos_token_id(self) -> int:
        return EOS_ID

    @property
    def pad_token_id(self) -> int:
        return UNK_ID

    @property
    def special_token_ids(self) -> dict[str, int]:
        return dict(self._special_ids)

    @property
    def prefix_token_ids(self) -> list[int]:
        """``[gMASK] sop``: every ChatGLM3 prompt starts with these."""
        return [self._special_ids["[gMASK]"], self._special_ids["sop"]]

    @property
    def chat_stop_token_ids(self) -> list[int]:
        """Stop a chat reply on eos, or when the model starts a user or observation turn.

        Stopping on eos alone lets the model write fake user turns; ``<|assistant|>`` is not a stop because a
        tool-call reply continues after it.
        """
        return [EOS_ID, self._special_ids["<|user|>"], self._special_ids["<|observation|>"]]

    def is_special(self, token_id: int) -> bool:
        """Whether the id is one of the nine appended special tokens."""
        return self._num_pieces <= token_id < self.vocab_size

    def byte_value(self, token_id: int) -> int | None:
        """The byte a byte-fallback piece stands for, or None for any other id."""
        value = token_id - BYTE_OFFSET
        return value if 0 <= value < 256 else None

    def byte_token_id(self, value: int) -> int:
        """The byte-fallback piece for one byte value (0..255)."""
        if not 0 <= value < 256:
            raise ValueError(f"not a byte value: {value}")
        return BYTE_OFFSET + value

    def check_id(self, token_id: int) -> int:
        """The id as a plain int; :class:`TokenizerError` if it is outside the vocabulary (padding included)."""
        token_id = operator.index(token_id)
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return token_id

    def id_to_piece(self, token_id: int) -> str:
        token_id = self.check_id(token_id)
        if token_id >= self._num_pieces:
            return SPECIAL_TOKENS[token_id - self._num_pieces]
        return self._sp.id_to_piece(token_id)

    def text_pieces(self) -> list[str | None]:
        """Every id's SentencePiece piece as stored (spaces as "▁", bytes as "<0xNN>"), None for the ids that
        stand for no text: <unk>, control and unused pieces, and the nine special tokens."""
        sp = self._sp
        pieces = [None if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) else sp.id_to_piece(i)
                  for i in range(self._num_pieces)]
        return pieces + [None] * len(SPECIAL_TOKENS)

    # ---- text <-> ids ---------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` prefixed by ``[gMASK] sop`` as ChatGLM3 expects."""
        if not isinstance(text, str):  # sentencepiece would quietly batch-encode a list
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._sp.encode(text)
        return self.prefix_token_ids + ids if add_special_tokens else ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``, decoded segment by segment between special tokens (as the reference does).

        Segments matter: SentencePiece drops the dummy-prefix space at the start of each decode call, so a reply
        after ``<|assistant|>`` decodes the same here as in the reference. Special tokens become their names unless
        skipped. An id outside the vocabulary (embedding padding included) raises :class:`TokenizerError`.
        """
        parts: list[str] = []
        segment: list[int] = []
        for token_id in ids:
            token_id = self.check_id(token_id)
            if token_id < self._num_pieces:
                segment.append(token_id)
                continue
            if segment:
                parts.append(self._sp.decode(segment))
                segment = []
            if not skip_special_tokens:
                parts.append(SPECIAL_TOKENS[token_id - self._num_pieces])
        if segment:
            parts.append(self._sp.decode(segment))
        return "".join(parts)


def _check_layout(sp: spm.SentencePieceProcessor, path: str) -> None:
    """Refuse models without ChatGLM3's fixed ids: eos, pad and the byte pieces are hard-wired elsewhere."""
    n = sp.vocab_size()
    ok = (n > BYTE_OFFSET + 256 and sp.is_unknown(UNK_ID) and sp.is_control(BOS_ID) and sp.is_control(EOS_ID)
          and sp.id_to_piece(BYTE_OFFSET) == "<0x00>" and sp.id_to_piece(BYTE_OFFSET + 255) == "<0xFF>"
          and sp.is_byte(BYTE_OFFSET) and sp.is_byte(BYTE_OFFSET + 255))
    if not ok:
        raise TokenizerError(f"{path} is not a ChatGLM3-layout SentencePiece model "
                             "(expected <unk> <s> </s> at 0..2 and byte-fallback pieces at 3..258)")
