"""One constrained request's grammar state: its matcher, advanced by exactly the tokens appended to its output.

Each sample of an n > 1 request has its own state (they share the compiled grammar). A preempted request keeps
its output tokens and so its matcher: the recompute only rebuilds KV, and the next token is masked from where
the matcher already is.

xgrammar has one stop token (eos). A request may end on other tokens: a chat on <|user|> or <|observation|>, a
tool call on <|observation|> only. So the eos bit of each mask row ("the grammar may end here") is moved onto the
request's own end tokens, and an end token is accepted as eos.
"""
from __future__ import annotations

import enum
import logging
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np
import torch

from glmserve.engine.core.request import FinishReason, Request
from glmserve.engine.structured.vocabulary import GrammarVocabulary

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompiledSpec:
    grammar: object                 # xgrammar CompiledGrammar
    vocab: GrammarVocabulary
    mask_first_token: bool          # keep the first token off "▁" pieces (see vocabulary.py); not for tool calls


class Step(enum.Enum):
    CONTINUE = "continue"           # the token extends the text
    END = "end"                     # the token ended a complete text
    REJECTED = "rejected"           # the grammar does not allow the token (never, when the mask was applied)


class RequestGrammar:
    def __init__(self, compiled: Future, end_token_ids: tuple[int, ...]):
        self._future = compiled
        self.end_token_ids = end_token_ids
        self._matcher = None
        self._spec: CompiledSpec | None = None

    @property
    def is_ready(self) -> bool:
        """Compiled (the scheduler admits the request only then)."""
        return self._future.done() and self._future.exception() is None

    @property
    def error(self) -> BaseException | None:
        """Why the compile failed, once it has."""
        return self._future.exception() if self._future.done() else None

    @property
    def spec(self) -> CompiledSpec:
        if self._spec is None:
            self._spec = self._future.result()
        return self._spec

    @property
    def matcher(self):
        if self._matcher is None:
            import xgrammar as xgr
            self._matcher = xgr.GrammarMatcher(self.spec.grammar)
        return self._matcher

    @property
    def is_terminated(self) -> bool:
        return self._matcher is not None and self._matcher.is_terminated()

    def fill(self, bits: torch.Tensor, words: np.ndarray, row: int, first_token: bool) -> None:
        """Write the allowed next tokens into row ``row`` of ``bits`` ([B, words] int32; ``words`` is its uint32
        numpy view)."""
        spec = self.spec
        self.matcher.fill_next_token_bitmask(bits, row)
        eos = spec.vocab.eos_token_id
        if self.end_token_ids != (eos,):
            can_end = (int(words[row, eos >> 5]) >> (eos & 31)) & 1
            words[row, eos >> 5] &= np.uint32(~(1 << (eos & 31)) & 0xFFFFFFFF)
            if can_end:
                for t in self.end_token_ids:
                    words[row, t >> 5] |= np.uint32(1 << (t & 31))
        if first_token and spec.mask_first_token:
            narrowed = words[row] & spec.vocab.no_leading_space
            if narrowed.any():   # a grammar that can only start with a space keeps its "▁" pieces
                words[row] = narrowed

    def accept(self, token_id: int) -> Step:
        matcher = self.matcher
        if token_id in self.end_token_ids:
            return Step.END if matcher.accept_token(self.spec.vocab.eos_token_id) else Step.REJECTED
        if token_id == self.spec.vocab.eos_token_id:   # eos that is not this request's end token
            return Step.REJECTED
        return Step.CONTINUE if matcher.accept_token(token_id) else Step.REJECTED


def advance_grammars(new_tokens: Iterable[tuple[Request, int]],
                     finish: Callable[[Request, FinishReason, int | str | None], None]) -> None:
    """Feed each constrained request its new token; a completed grammar finishes its request (stop), whatever
    min_tokens or ignore_eos say."""
    for request, token in new_tokens:
        grammar = request.grammar
        if grammar is None:
            continue
        step = grammar.accept(token)
        if request.is_finished:
            continue
        if step is Step.END:
            finish(request, FinishReason.STOP, token)
        elif step is Step.REJECTED:
            log.error("request %s: token %d breaks its grammar; the request is aborted", request.request_id, token)
            finish(request, FinishReason.ABORT, None)
