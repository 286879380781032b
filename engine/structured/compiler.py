"""Grammar compilation off the engine's loop, with a cache per schema/grammar.

``validate`` parses a request's StructuredOutput when the request arrives (grammars.py: quick, and a bad one fails
the request there). ``request_grammar`` then hands the compile (the vocabulary-wide part) to a worker thread and
returns the request's matcher state at once; the scheduler leaves the request waiting until the compile is done,
so a slow compile holds up only its own requests. xgrammar releases the GIL while it compiles, so the engine
thread keeps stepping meanwhile.

Both caches are keyed by (kind, the schema/regex/choices/EBNF text, chat): requests with the same schema share one
parse and one compiled grammar (and the samples of an n > 1 request always do). They keep the most recently used
``max_cached`` entries, the compiled ones also within ``max_cached_bytes`` (a compiled grammar holds token masks
over the whole vocabulary: 0.2-2 MiB each on ChatGLM3's for typical API schemas). xgrammar, and the vocabulary it
is told about, load on the first structured request only.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

from glmserve.engine.core.sampling_params import StructuredOutput
from glmserve.engine.structured.grammars import build_grammar, cache_key
from glmserve.engine.structured.request_grammar import CompiledSpec, RequestGrammar
from glmserve.engine.structured.vocabulary import GrammarVocabulary, grammar_vocabulary, tokenizer_info
from glmserve.engine.text.tokenizer import ChatGLMTokenizer

log = logging.getLogger(__name__)

DEFAULT_MAX_CACHED = 256
DEFAULT_MAX_CACHED_BYTES = 256 << 20


@dataclass
class CompileStats:
    compiles: int = 0               # cold compiles done
    compile_seconds: float = 0.0    # their total time (in the worker thread)
    hits: int = 0                   # requests served by a cached (or in-flight) compile
    last_compile_seconds: list[float] = field(default_factory=list)


class StructuredOutputs:
    """One per engine: validates, compiles and caches grammars, and makes each constrained request's state."""

    def __init__(self, tokenizer: ChatGLMTokenizer, width: int, *, max_cached: int = DEFAULT_MAX_CACHED,
                 max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES, compile_threads: int = 1):
        self._tokenizer = tokenizer
        self._width = width                  # logits columns (the model's padded vocabulary)
        self._max_cached = max_cached
        self._max_cached_bytes = max_cached_bytes
        self._compile_threads = compile_threads
        self._lock = threading.Lock()        # validate() runs on server threads, the rest on the engine thread
        self._parsed: OrderedDict[tuple, object] = OrderedDict()
        self._compiled: OrderedDict[tuple, Future] = OrderedDict()
        self._pool: ThreadPoolExecutor | None = None
        self._backend_lock = threading.Lock()
        self._backend: tuple[GrammarVocabulary, object] | None = None   # (vocabulary, xgrammar GrammarCompiler)
        self.stats = CompileStats()

    # ---- when a request arrives -----------------------------------------------------------------------------
    def validate(self, spec: StructuredOutput, *, chat: bool) -> None:
        """Raise SamplingParamsError naming the problem (bad schema, regex, EBNF); the parse is cached."""
        self._grammar(spec, chat)

    def request_grammar(self, spec: StructuredOutput, *, chat: bool,
                        stop_token_ids: Sequence[int] = ()) -> RequestGrammar:
        """A fresh matcher state for one request (one per sample), its grammar compiling in the background."""
        return RequestGrammar(self.compile(spec, chat=chat), self._end_tokens(spec, stop_token_ids))

    def compile(self, spec: StructuredOutput, *, chat: bool) -> Future:
        """The compiled grammar of ``spec`` as a future: cached, in flight, or submitted now."""
        key = cache_key(spec, chat)
        with self._lock:
            future = self._compiled.get(key)
            if future is not None and not (future.done() and future.exception() is not None):
                self._compiled.move_to_end(key)
                self.stats.hits += 1
                return future
        grammar = self._grammar(spec, chat)
        mask_first = spec.kind != "tool_call"
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._compile_threads, thread_name_prefix="glmserve-grammar")
            future = self._pool.submit(self._compile_now, grammar, mask_first)
            self._remember(self._compiled, key, future)
            self._trim_compiled()
        return future

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals ------------------------------------------------------------------------------------------
    def _grammar(self, spec: StructuredOutput, chat: bool):
        key = cache_key(spec, chat)
        with self._lock:
            grammar = self._parsed.get(key)
            if grammar is not None:
                self._parsed.move_to_end(key)
                return grammar
        grammar = build_grammar(spec, chat=chat)   # outside the lock: a big schema must not block other callers
        with self._lock:
            self._remember(self._parsed, key, grammar)
        return grammar

    def _remember(self, cache: OrderedDict, key: tuple, value) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self._max_cached:
            cache.popitem(last=False)

    def _trim_compiled(self) -> None:
        """Drop the least recently used compiled grammars past the byte budget (the newest always stays; requests
        holding a dropped one keep it)."""
        sizes = [_size(f) for f in self._compiled.values()]
        total = sum(sizes)
        for key, size in zip(list(self._compiled), sizes[:-1]):
            if total <= self._max_cached_bytes:
                break
            del self._compiled[key]
            total -= size

    def _compile_now(self, grammar, mask_first_token: bool) -> CompiledSpec:
        """Runs in the worker thread."""
        vocab, compiler = self._ensure_backend()
        start = time.perf_counter()
        compiled = compiler.compile_grammar(grammar)
        seconds = time.perf_counter() - start
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += seconds
            self.stats.last_compile_seconds = (self.stats.last_compile_seconds + [seconds])[-64:]
        return CompiledSpec(compiled, vocab, mask_first_token)

    def _ensure_backend(self) -> tuple[GrammarVocabulary, object]:
        with self._backend_lock:
            if self._backend is None:
                import xgrammar as xgr

                vocab = grammar_vocabulary(self._tokenizer, self._width)
                # Caching is done here (per request kind and text); xgrammar's own cache would hold a second copy.
                compiler = xgr.GrammarCompiler(tokenizer_info(vocab), max_threads=self._compile_threads,
                                               cache_enabled=False)
                self._backend = (vocab, compiler)
            return self._backend

    def _end_tokens(self, spec: StructuredOutput, stop_token_ids: Sequence[int]) -> tuple[int, ...]:
        """Tokens that end the text once the grammar is complete: <|observation|> for a tool call; otherwise eos
        and the request's special stop tokens (a chat adds <|user|> and <|observation|>)."""
        tok = self._tokenizer
        if spec.kind == "tool_call":
            return (tok.special_token_ids["<|observation|>"],)
        extra = [t for t in stop_token_ids if tok.is_special(t) and t != tok.eos_token_id]
        return tuple(dict.fromkeys([tok.eos_token_id, *extra]))


def _size(future: Future) -> int:
    """Bytes of a compiled grammar (0 while it compiles, or if it failed)."""
    if not future.done() or future.exception() is not None:
        return 0
    return future.result().grammar.memory_size_bytes
