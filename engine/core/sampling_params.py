"""Per-request sampling parameters, with vLLM's names and defaults, and their validation."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

# Temperatures below this are treated as greedy: dividing logits by a denormal-sized temperature overflows to inf
# and turns the softmax into NaN, while the result would be argmax anyway.
GREEDY_TEMPERATURE = 1e-5
MAX_LOGPROBS = 20


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; ``field`` names it so the server can point at the offending request field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name

    def __reduce__(self):   # rebuilt from its arguments when it crosses a process boundary
        return type(self), (self.field, str(self))


STRUCTURED_KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "tool_call")


@dataclass(frozen=True)
class StructuredOutput:
    """What the generated text must match: set exactly one field.

    The grammar engine (engine/structured) parses and compiles it; here only the types are checked. The text it
    constrains is what the client receives: a chat reply's content after the empty metadata line, or the whole
    completion of a Generate call.
    """

    json_schema: str | dict | None = None   # a JSON Schema, as JSON text or an already parsed object
    json_object: bool = False               # any JSON object
    regex: str | None = None                # the whole text matches it
    choice: Sequence[str] | None = None     # the text is exactly one of these strings
    grammar: str | None = None              # EBNF (xgrammar's dialect: rules `name ::= ...`, starting at `root`)
    # A whole ChatGLM3 tool-call reply in EBNF (tool name line, then the ```python block), ending on
    # <|observation|>; built from a request's tools by engine/structured/tool_call_grammar.py, chat only.
    tool_call: str | None = None

    def __post_init__(self) -> None:
        if self.choice is not None and not isinstance(self.choice, (str, bytes)):
            object.__setattr__(self, "choice", tuple(self.choice))

    @property
    def kind(self) -> str:
        """The one field that is set (check() has passed)."""
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    def check(self) -> None:
        """Types only (cheap); raise ``SamplingParamsError`` naming ``structured.<field>``."""
        kinds = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(kinds) != 1:
            raise SamplingParamsError("structured", "structured output must set exactly one of "
                                      f"{', '.join(STRUCTURED_KINDS[:5])}; got {', '.join(kinds) or 'none'}")
        if not isinstance(self.json_object, bool):
            raise SamplingParamsError("structured.json_object", f"structured.json_object must be a boolean, "
                                      f"got {self.json_object!r}")
        schema = self.json_schema
        if schema is not None and not (isinstance(schema, dict) or _non_empty_str(schema)):
            raise SamplingParamsError("structured.json_schema", "structured.json_schema must be a JSON object or "
                                      f"non-empty JSON text, got {type(self.json_schema).__name__}")
        for name in ("regex", "grammar", "tool_call"):
            value = getattr(self, name)
            if value is not None and not _non_empty_str(value):
                raise SamplingParamsError(f"structured.{name}", f"structured.{name} must be a non-empty string, "
                                          f"got {value!r}")
        if self.choice is not None:
            if isinstance(self.choice, (str, bytes)) or not self.choice:
                raise SamplingParamsError("structured.choice", "structured.choice must be a non-empty list of "
                                          f"strings, got {self.choice!r}")
            bad = next((c for c in self.choice if not _non_empty_str(c)), None)
            if bad is not None:
                raise SamplingParamsError("structured.choice", f"structured.choice entries must be non-empty "
                                          f"strings, got {bad!r}")


def _non_empty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1                      # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0      # over prompt + output tokens (HF/vLLM style)
    presence_penalty: float = 0.0        # over output tokens (OpenAI style)
    frequency_penalty: float = 0.0       # over output tokens (OpenAI style)
    seed: int | None = None
    max_tokens: int | None = 16          # None: until the model's context is full
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None          # top logprobs returned besides the chosen token; 0: only the chosen one
    skip_special_tokens: bool = True
    # A ChatGLM3 reply decodes with a leading "\n " (the empty metadata line's newline, then the content's
    # dummy-prefix space); the chat layer asks for it to be removed. The engine itself knows nothing of chats.
    strip_reply_prefix: bool = False
    # Constrained decoding: the text follows this grammar, and the request ends (finish reason stop) once the
    # grammar is complete, whatever min_tokens and ignore_eos say; it may still end on length first.
    structured: StructuredOutput | None = None

    def __post_init__(self) -> None:
        # A single stop string is as common in requests as a list; store a list either way.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        else:
            self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def clone(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    def validate(self, *, vocab_size: int, max_model_len: int | None = None,
                 prompt_len: int | None = None) -> None:
        """Raise ``SamplingParamsError`` for the first invalid field (message names the field and its range)."""
        _check_int("n", self.n, low=1)
        _check_float("temperature", self.temperature, ">= 0", lambda v: v >= 0)
        _check_float("top_p", self.top_p, "in (0, 1]", lambda v: 0 < v <= 1)
        _check_int("top_k", self.top_k, low=-1, note=" (-1 or 0 disables it)")
        _check_float("min_p", self.min_p, "in [0, 1]", lambda v: 0 <= v <= 1)
        _check_float("repetition_penalty", self.repetition_penalty, "> 0", lambda v: v > 0)
        for name in ("presence_penalty", "frequency_penalty"):
            _check_float(name, getattr(self, name), "in [-2, 2]", lambda v: -2 <= v <= 2)
        if self.seed is not None:
            _check_int("seed", self.seed)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, low=1)
            if max_model_len is not None and prompt_len is not None and prompt_len + self.max_tokens > max_model_len:
                raise SamplingParamsError(
                    "max_tokens",
                    f"max_tokens: prompt length {prompt_len} + max_tokens {self.max_tokens} = "
                    f"{prompt_len + self.max_tokens} exceeds max_model_len {max_model_len}")
        _check_int("min_tokens", self.min_tokens, low=0, high=self.max_tokens)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SamplingParamsError("stop", f"stop strings must be non-empty strings, got {s!r}")
        for t in self.stop_token_ids:
            _check_int("stop_token_ids", t, low=0, high=vocab_size - 1)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0, high=MAX_LOGPROBS)
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutput):
                raise SamplingParamsError("structured", "structured must be a StructuredOutput, got "
                                          f"{type(self.structured).__name__}")
            self.structured.check()


def _check_int(name: str, value: Any, low: int | None = None, high: int | None = None, note: str = "") -> None:
    lo = "-inf" if low is None else str(low)
    hi = "inf" if high is None else str(high)
    # bool is an int subclass, but True as a seed or a count is a client bug worth reporting.
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and ((low is not None and value < low) or (high is not None and value > high)):
        ok = False
    if not ok:
        raise SamplingParamsError(name, f"{name} must be an integer in [{lo}, {hi}]{note}, got {value!r}")


def _check_float(name: str, value: Any, allowed: str, in_range: Callable[[float], bool]) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and in_range(value)
    if not ok:
        raise SamplingParamsError(name, f"{name} must be a finite number {allowed}, got {value!r}")
