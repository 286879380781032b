"""A request's StructuredOutput -> an xgrammar Grammar, or a SamplingParamsError naming what is wrong with it.

Parsing a schema, regex or EBNF into a Grammar is quick (no vocabulary involved), so it runs when the request
arrives and a bad one fails there, before anything is queued; compiling against the vocabulary is the slow part
and runs later, off the engine's loop (compiler.py).

JSON is written one fixed way (", " and ": " between items, no other whitespace): with free whitespace a weak or
unlucky model can pad a reply with blanks until max_tokens, and a JSON reader does not care.

In a chat, the grammar covers the reply's content. A ChatGLM3 reply starts with its metadata line (empty for a
plain answer) and "\\n", then the content with the dummy-prefix space of its first piece, which the server strips
from the text it returns (chat_format.clean_reply). So a chat grammar is "\\n " followed by the content's grammar:
the model writes what it was trained to write, and the client gets exactly the text the content grammar matched.
A tool call covers the whole reply, metadata line included (tool_call_grammar.py).
"""
from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any

from glmserve.engine.core.sampling_params import SamplingParamsError, StructuredOutput
from glmserve.engine.structured.python_literal import ebnf_string
from glmserve.engine.structured.schema_check import SchemaError, prepare_schema

CHAT_CONTENT_PREFIX = "\n "
# xgrammar's messages start with a timestamp and a C++ source location: "[04:23:03] /project/cpp/x.cc:94: ".
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")


def cache_key(spec: StructuredOutput, chat: bool) -> tuple:
    """Requests with equal keys share one compiled grammar."""
    kind = spec.kind
    value = getattr(spec, kind)
    if kind == "json_schema" and isinstance(value, dict):
        value = json.dumps(value, ensure_ascii=False)   # key order kept: it is the order the grammar writes
    return kind, value if not isinstance(value, list) else tuple(value), chat and kind != "tool_call"


def build_grammar(spec: StructuredOutput, *, chat: bool):
    """The xgrammar Grammar for ``spec`` (``chat``: a chat reply's content). Raises SamplingParamsError."""
    import xgrammar as xgr

    kind = spec.kind
    field = f"structured.{kind}"
    if kind == "tool_call" and not chat:
        raise SamplingParamsError(field, f"{field}: a tool-call grammar applies to chat replies only")
    try:
        if kind == "json_schema":
            grammar = xgr.Grammar.from_json_schema(_schema_text(spec.json_schema, field), any_whitespace=False,
                                                   strict_mode=True)
        elif kind == "json_object":
            grammar = xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False, strict_mode=False)
        elif kind == "regex":
            grammar = xgr.Grammar.from_regex(spec.regex)
        elif kind == "choice":
            grammar = xgr.Grammar.from_ebnf("root ::= " + " | ".join(ebnf_string(c) for c in spec.choice))
        else:   # grammar, tool_call: EBNF
            grammar = xgr.Grammar.from_ebnf(getattr(spec, kind))
    except RuntimeError as exc:
        raise SamplingParamsError(field, f"{field}: {engine_message(exc)}") from None
    if chat and kind != "tool_call":
        grammar = xgr.Grammar.concat(xgr.Grammar.from_ebnf(f"root ::= {ebnf_string(CHAT_CONTENT_PREFIX)}"), grammar)
    return grammar


_CHECKED_MAX = 256
_checked: OrderedDict[tuple, bool] = OrderedDict()
_checked_lock = threading.Lock()


def check_structured(spec: StructuredOutput, *, chat: bool) -> None:
    """Parse ``spec`` as the engine core will, so that a frontend refuses a bad one before sending it (the last
    ``_CHECKED_MAX`` good ones are remembered). Raises SamplingParamsError naming the problem."""
    key = cache_key(spec, chat)
    with _checked_lock:
        if key in _checked:
            _checked.move_to_end(key)
            return
    build_grammar(spec, chat=chat)
    with _checked_lock:
        _checked[key] = True
        while len(_checked) > _CHECKED_MAX:
            _checked.popitem(last=False)


def engine_message(exc: BaseException) -> str:
    """xgrammar's error without its timestamp and source location (first line only)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return _LOCATION.sub("", text)


def _schema_text(schema: Any, field: str) -> str:
    """The schema as JSON text, after checking that every rule in it would be enforced."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise SamplingParamsError(field, f"{field}: not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise SamplingParamsError(field, f"{field}: a JSON Schema must be a JSON object, got {type(schema).__name__}")
    try:
        return json.dumps(prepare_schema(schema), ensure_ascii=False)
    except SchemaError as exc:
        raise SamplingParamsError(field, f"{field}: {exc}") from None
    except (TypeError, ValueError, RecursionError) as exc:   # not JSON data (an offline caller's dict), or too deep
        raise SamplingParamsError(field, f"{field}: {exc}") from None
