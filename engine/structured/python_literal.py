"""EBNF for Python literal values that are valid for a JSON Schema: the arguments of a ChatGLM3 tool call.

A tool call is Python (``tool_call(city="Beijing", days=3, metric=True)``), read with ``ast``: booleans and null
are True/False/None, not JSON's literals, so xgrammar's JSON-Schema converter cannot be reused. This one covers the
part of JSON Schema that tool parameters use, and refuses the rest with an error naming the keyword and where it
is, so that every accepted schema's output validates:

- ``type`` (one or a list), ``enum``, ``const``, ``anyOf``, local ``$ref`` into ``$defs``/``definitions``;
- strings: ``minLength``/``maxLength``; integers: ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``;
- numbers: the same bounds (the grammar writes, within them, integers and decimals with up to 6 fraction digits
  whose whole part keeps every fraction inside: a subset of the valid numbers, never a value outside);
- arrays: ``items``, ``minItems``/``maxItems``; objects: ``properties`` in their declared order, ``required``,
  ``additionalProperties`` (only a schema opens an object without properties to other keys).

The text is written one fixed way (", " between items, ": " in dicts, double-quoted strings with the escapes
\\" \\\\ \\n \\r \\t only): free whitespace would let a weak model pad forever, and those escapes mean the same in
Python and JSON.
"""
from __future__ import annotations

import itertools
import json
import keyword
import math
from typing import Any

from glmserve.engine.structured.int_range import integer_range_ebnf

_ANNOTATIONS = {"title", "description", "default", "examples", "$comment", "$schema", "$id", "$anchor", "format",
                "deprecated", "readOnly", "writeOnly", "contentEncoding", "contentMediaType", "$defs", "definitions"}
_BY_TYPE = {
    "string": {"minLength", "maxLength"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "array": {"items", "minItems", "maxItems"},
    "object": {"properties", "required", "additionalProperties"},
    "boolean": set(),
    "null": set(),
}
_SUPPORTED = _ANNOTATIONS | {"type", "enum", "const", "anyOf", "$ref"} | set().union(*_BY_TYPE.values())

# Fraction digits of a bounded number: as many as a float carries meaningfully, so that a bounded value is also
# bounded in length (xgrammar does the same for JSON numbers with bounds).
FRACTION = "[0-9]{1,6}"
# Shared rules, added to a grammar when first used.
_BASE_RULES = {
    "py_char": r'[^"\\\0-\x1f] | "\\" ["\\nrt]',
    "py_string": r'"\"" py_char* "\""',
    "py_int": r'"-"? ("0" | [1-9] [0-9]*)',
    "py_number": r'py_int ("." [0-9]+)? ([eE] [+\-]? [0-9]+)?',
    "py_any": r'py_string | py_number | "True" | "False" | "None" | "[" (py_any (", " py_any)*)? "]" '
              r'| "{" (py_string ": " py_any (", " py_string ": " py_any)*)? "}"',
}
_BASE_DEPENDS = {"py_string": ["py_char"], "py_number": ["py_int"], "py_any": ["py_string", "py_number"]}


class SchemaGrammarError(ValueError):
    """A schema that this grammar cannot express exactly; the message names the keyword and where it is."""


class PythonLiteralGrammar:
    """Collects EBNF rules; ``value(schema, path)`` returns the rule name for values valid for ``schema``.

    ``root_schema`` is what local ``$ref``s point into; ``where`` starts every error message (e.g. a tool's name).
    """

    def __init__(self, root_schema: Any, where: str, prefix: str = "a"):
        self.rules: dict[str, str] = {}
        self._root = root_schema
        self._where = where
        self._prefix = prefix
        self._names = itertools.count()
        self._refs: dict[str, str] = {}

    def ebnf(self) -> str:
        return "\n".join(f"{name} ::= {body}" for name, body in self.rules.items())

    # ---- schemas --------------------------------------------------------------------------------------------
    def value(self, schema: Any, path: str) -> str:
        if schema is True or schema == {}:
            return self._base("py_any")
        if not isinstance(schema, dict):
            raise self._error(path, "a schema must be an object (or true)" if schema is not False
                              else "the schema 'false' allows no value")
        unknown = sorted(set(schema) - _SUPPORTED)
        if unknown:
            raise self._error(path, f"keyword {unknown[0]!r} is not supported in a constrained tool call")
        if "$ref" in schema:
            self._only(schema, path, "$ref")
            return self._ref(schema["$ref"], path)
        if "anyOf" in schema:
            self._only(schema, path, "anyOf")
            branches = schema["anyOf"]
            if not isinstance(branches, list) or not branches:
                raise self._error(path, "'anyOf' must be a non-empty list of schemas")
            return self._rule(" | ".join(self.value(b, f"{path}.anyOf[{i}]") for i, b in enumerate(branches)))
        types = self._types(schema, path)
        if "const" in schema or "enum" in schema:
            return self._literals(schema, types, path)
        return self._rule(" | ".join(self._typed(t, schema, path) for t in types))

    def keyword_arguments(self, schema: Any, path: str) -> str:
        """An expression for ``name=value, ...`` of an object schema (a call's arguments, no parentheses)."""
        if schema is None or schema == {}:
            return '""'
        if not isinstance(schema, dict) or self._types(schema, path) != ["object"]:
            raise self._error(path, "tool parameters must be an object schema ({\"type\": \"object\", ...})")
        unknown = sorted(set(schema) - _ANNOTATIONS - {"type"} - _BY_TYPE["object"])
        if unknown:
            raise self._error(path, f"keyword {unknown[0]!r} is not supported for tool parameters")
        properties, required = self._properties(schema, path)
        for name in properties:
            if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
                raise self._error(path, f"parameter {name!r} is not a Python identifier, so tool_call() cannot "
                                  "take it as a keyword argument")
        entries = [(f'"{name}=" {self.value(sub, f"{path}.properties.{name}")}', name in required)
                   for name, sub in properties.items()]
        return self._sequence(entries)

    # ---- by type --------------------------------------------------------------------------------------------
    def _types(self, schema: dict, path: str) -> list[str]:
        declared = schema.get("type")
        if declared is None:   # no type: the types whose keywords appear, or any value
            implied = [t for t, words in _BY_TYPE.items() if words & schema.keys() and t != "integer"]
            return implied or ["string", "number", "boolean", "null", "array", "object"]
        types = [declared] if isinstance(declared, str) else declared
        if not isinstance(types, list) or not types or any(t not in _BY_TYPE for t in types):
            raise self._error(path, f"'type' must be one of {', '.join(_BY_TYPE)} or a list of them, got {declared!r}")
        if "number" in types and "integer" in types:   # numbers include the integers
            types = [t for t in types if t != "integer"]
        for word in sorted(schema.keys() - _ANNOTATIONS - {"type", "enum", "const"}):
            if not any(word in _BY_TYPE[t] for t in types):
                raise self._error(path, f"keyword {word!r} does not apply to type {'/'.join(types)}")
        return types

    def _typed(self, kind: str, schema: dict, path: str) -> str:
        if kind == "boolean":
            return '"True" | "False"'
        if kind == "null":
            return '"None"'
        if kind == "string":
            low, high = self._count(schema, "minLength", path), self._count(schema, "maxLength", path)
            if low == 0 and high is None:
                return self._base("py_string")
            self._base("py_char")
            return f'"\\"" py_char{{{low},{"" if high is None else high}}} "\\""'
        if kind == "integer":
            bounds = self._numeric_bounds(schema, path)
            return self._range(*self._integer_bounds(bounds), path) if bounds else self._base("py_int")
        if kind == "number":
            return self._number(schema, path)
        if kind == "array":
            return self._array(schema, path)
        return self._object(schema, path)

    def _number(self, schema: dict, path: str) -> str:
        bounds = self._numeric_bounds(schema, path)
        if not bounds:
            return self._base("py_number")
        low, high = self._integer_bounds(bounds)
        lower = max((v for w, v in bounds.items() if w.endswith("inimum")), default=None)
        upper = min((v for w, v in bounds.items() if w.endswith("aximum")), default=None)
        parts = [self._range(low, high, path)]
        # "m.ddd" lies in [m, m + 1): allowed when m is (m >= low) and m + 1 <= upper.
        up_low, up_high = max(0, low if low is not None else 0), None if upper is None else math.floor(upper) - 1
        if up_high is None or up_low <= up_high:
            parts.append(f'{integer_range_ebnf(up_low, up_high)} "." {FRACTION}')
        # "-m.ddd" lies in (-(m + 1), -m]: allowed when -m is (-m <= high) and -(m + 1) >= lower.
        down_low, down_high = max(0, -high if high is not None else 0), None if lower is None else -math.ceil(lower) - 1
        if down_high is None or down_low <= down_high:
            parts.append(f'"-" {integer_range_ebnf(down_low, down_high)} "." {FRACTION}')
        return " | ".join(f"({p})" for p in parts)

    def _array(self, schema: dict, path: str) -> str:
        low, high = self._count(schema, "minItems", path), self._count(schema, "maxItems", path)
        if high is not None and high < low:
            raise self._error(path, f"maxItems {high} is below minItems {low}")
        if high == 0:
            return '"[]"'
        items = schema.get("items", True)
        if isinstance(items, list):
            raise self._error(path, "'items' as a list (tuple validation) is not supported")
        item = self.value(items, f"{path}.items")
        more_high = "" if high is None else high - 1
        if low == 0:
            return f'"[" ({item} (", " {item}){{0,{more_high}}})? "]"'
        return f'"[" {item} (", " {item}){{{low - 1},{more_high}}} "]"'

    def _object(self, schema: dict, path: str) -> str:
        properties, required = self._properties(schema, path)
        extra = schema.get("additionalProperties", False)
        if not properties and extra is not False:
            value = self.value(extra, f"{path}.additionalProperties")
            string = self._base("py_string")
            entry = f'{string} ": " {value}'
            return f'"{{" ({entry} (", " {entry})*)? "}}"'
        entries = [(f'{_quote(_literal(name))} ": " {self.value(sub, f"{path}.properties.{name}")}', name in required)
                   for name, sub in properties.items()]
        return f'"{{" {self._sequence(entries)} "}}"'

    def _properties(self, schema: dict, path: str) -> tuple[dict, set]:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(properties, dict):
            raise self._error(path, "'properties' must be an object")
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise self._error(path, "'required' must be a list of names")
        missing = [name for name in required if name not in properties]
        if missing:
            raise self._error(path, f"required property {missing[0]!r} is not listed in 'properties'")
        return properties, set(required)

    def _literals(self, schema: dict, types: list[str], path: str) -> str:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list) or not values:
            raise self._error(path, "'enum' must be a non-empty list")
        if schema.keys() - _ANNOTATIONS - {"type", "enum", "const"}:
            raise self._error(path, "'enum'/'const' can only be combined with 'type' here")
        if "type" in schema:
            values = [v for v in values if any(_has_type(v, t) for t in types)]
            if not values:
                raise self._error(path, "no value of 'enum'/'const' has the schema's type")
        try:
            texts = list(dict.fromkeys(_literal(v) for v in values))
        except (TypeError, ValueError) as exc:
            raise self._error(path, f"'enum'/'const': {exc}") from None
        return self._rule(" | ".join(_quote(t) for t in texts))

    # ---- helpers --------------------------------------------------------------------------------------------
    def _sequence(self, entries: list[tuple[str, bool]]) -> str:
        """Entries in order, comma-separated, the optional ones skippable: two rules per entry, "first"
        (nothing written yet) and "more" (each entry preceded by ", ")."""
        first_next = more_next = '""'
        for expr, required in reversed(entries):
            more = self._rule(f'", " {expr} {more_next}' if required else f'(", " {expr} {more_next}) | {more_next}')
            first = self._rule(f"{expr} {more_next}" if required else f"({expr} {more_next}) | {first_next}")
            first_next, more_next = first, more
        return first_next

    def _ref(self, ref: Any, path: str) -> str:
        if not isinstance(ref, str) or not ref.startswith(("#/$defs/", "#/definitions/")):
            raise self._error(path, f"only local references into $defs or definitions are supported, got {ref!r}")
        if ref not in self._refs:
            target: Any = self._root
            for part in ref[2:].split("/"):
                part = part.replace("~1", "/").replace("~0", "~")
                if not isinstance(target, dict) or part not in target:
                    raise self._error(path, f"$ref {ref!r} points at nothing")
                target = target[part]
            name = self._refs[ref] = f"{self._prefix}_{next(self._names)}"
            self.rules[name] = ""   # reserved first: a recursive schema refers to its own rule
            self.rules[name] = self.value(target, ref[2:].replace("/", "."))
        return self._refs[ref]

    def _rule(self, body: str) -> str:
        name = f"{self._prefix}_{next(self._names)}"
        self.rules[name] = body
        return name

    def _base(self, name: str) -> str:
        for dependency in _BASE_DEPENDS.get(name, []):
            self._base(dependency)
        self.rules.setdefault(name, _BASE_RULES[name])
        return name

    def _range(self, low: int | None, high: int | None, path: str) -> str:
        try:
            return integer_range_ebnf(low, high)
        except ValueError:
            raise self._error(path, "the bounds leave no value the grammar can write") from None

    def _count(self, schema: dict, word: str, path: str) -> int | None:
        value = schema.get(word)
        if value is None:
            return 0 if word.startswith("min") else None
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise self._error(path, f"{word!r} must be a non-negative integer, got {value!r}")
        return value

    def _numeric_bounds(self, schema: dict, path: str) -> dict[str, float]:
        bounds = {}
        for word in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            value = schema.get(word)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise self._error(path, f"{word!r} must be a finite number, got {value!r}")
            bounds[word] = value
        return bounds

    @staticmethod
    def _integer_bounds(bounds: dict[str, float]) -> tuple[int | None, int | None]:
        """The smallest and the largest integer the bounds allow (None: unbounded)."""
        lows = [math.ceil(v) if w == "minimum" else math.floor(v) + 1
                for w, v in bounds.items() if w.endswith("inimum")]
        highs = [math.floor(v) if w == "maximum" else math.ceil(v) - 1
                 for w, v in bounds.items() if w.endswith("aximum")]
        return max(lows, default=None), min(highs, default=None)

    def _only(self, schema: dict, path: str, word: str) -> None:
        others = sorted(schema.keys() - _ANNOTATIONS - {word})
        if others:
            raise self._error(path, f"{word!r} cannot be combined with {others[0]!r} here")

    def _error(self, path: str, message: str) -> SchemaGrammarError:
        return SchemaGrammarError(f"{self._where}{'.' + path if path else ''}: {message}")


def _has_type(value: Any, kind: str) -> bool:
    if kind == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, float)
                                                                           and value.is_integer())
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, {"string": str, "boolean": bool, "null": type(None), "array": list,
                              "object": dict}[kind])


def _literal(value: Any) -> str:
    """The Python literal text of a JSON value (as the grammar writes it)."""
    if value is None or isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a JSON number")
        return repr(value)
    if isinstance(value, str):
        value.encode("utf-8")   # a lone surrogate raises UnicodeEncodeError (a ValueError)
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_literal(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"{type(value).__name__} is not a JSON value")


def _quote(text: str) -> str:
    """An EBNF string literal matching exactly ``text``."""
    return ebnf_string(text)


def ebnf_string(text: str) -> str:
    """``text`` as an xgrammar EBNF string literal."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'
