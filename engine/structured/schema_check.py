"""JSON Schemas made safe for xgrammar: refuse the rules it would not enforce, rewrite the ones it gets wrong.

xgrammar compiles most of JSON Schema into the grammar, but (checked against xgrammar 0.2.9):

- it silently accepts keywords it does not enforce: ``not``, ``allOf`` with more than one schema, ``oneOf`` (read
  as anyOf, so a value matching two branches gets through), ``if``/``then``/``else``, ``dependentRequired``,
  ``dependentSchemas``, ``contains``, ``uniqueItems``, a ``required`` name that ``properties`` does not list, and
  ``minLength``/``maxLength`` beside ``pattern`` or ``format`` (the lengths are dropped). Such a schema would let
  through output that fails validation, so it is refused up front, naming the keyword and where it is;
- for a string with ``minLength``/``maxLength`` it allows raw control characters (invalid JSON), so those bounds
  are rewritten as the equivalent ``pattern`` over characters that need no escaping, which xgrammar gets right.

Every output of an accepted schema then parses and validates.
"""
from __future__ import annotations

from typing import Any

_NOT_ENFORCED = {
    "not": "'not' is not enforced by the grammar engine",
    "oneOf": "'oneOf' is not enforced (a value matching two branches would pass): use anyOf",
    "if": "'if'/'then'/'else' are not enforced by the grammar engine",
    "then": "'if'/'then'/'else' are not enforced by the grammar engine",
    "else": "'if'/'then'/'else' are not enforced by the grammar engine",
    "dependentRequired": "'dependentRequired' is not enforced by the grammar engine",
    "dependentSchemas": "'dependentSchemas' is not enforced by the grammar engine",
    "dependencies": "'dependencies' is not enforced by the grammar engine",
    "contains": "'contains' is not enforced by the grammar engine",
    "minContains": "'minContains' is not enforced by the grammar engine",
    "maxContains": "'maxContains' is not enforced by the grammar engine",
    "unevaluatedItems": "'unevaluatedItems' is not enforced by the grammar engine",
}
# Keywords whose value is a schema, a list of schemas, or a name -> schema map.
_SCHEMA = ("additionalProperties", "items", "propertyNames", "unevaluatedProperties", "contentSchema")
_SCHEMA_LIST = ("anyOf", "allOf", "prefixItems")
_SCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions")


class SchemaError(ValueError):
    """A schema the constrained output could not be guaranteed to satisfy; the message names where."""


# A JSON string's characters that need no escape: what a length-bounded string is written with.
_PLAIN_CHARACTER = '[^\\x00-\\x1f"\\\\]'


def prepare_schema(schema: Any, path: str = "") -> Any:
    """A copy of ``schema`` that xgrammar compiles faithfully; SchemaError (naming where) if there is none."""
    check_enforceable(schema, path)
    return _rewrite_lengths(schema)


def _rewrite_lengths(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if {"minLength", "maxLength"} & out.keys() and not {"pattern", "format"} & out.keys():
        low, high = out.pop("minLength", 0), out.pop("maxLength", None)
        out["pattern"] = f"^{_PLAIN_CHARACTER}{{{low},{'' if high is None else high}}}$"
    for keyword in _SCHEMA:
        if isinstance(out.get(keyword), dict):
            out[keyword] = _rewrite_lengths(out[keyword])
    for keyword in _SCHEMA_LIST:
        if isinstance(out.get(keyword), list):
            out[keyword] = [_rewrite_lengths(sub) for sub in out[keyword]]
    for keyword in _SCHEMA_MAP:
        if isinstance(out.get(keyword), dict):
            out[keyword] = {name: _rewrite_lengths(sub) for name, sub in out[keyword].items()}
    return out


def check_enforceable(schema: Any, path: str = "") -> None:
    """Raise SchemaError for the first keyword the grammar would not enforce (``path`` locates it)."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise SchemaError(f"{_at(path)}a schema must be an object or a boolean, got {type(schema).__name__}")
    for keyword, reason in _NOT_ENFORCED.items():
        if keyword in schema:
            raise SchemaError(f"{_at(path)}{reason}")
    if schema.get("uniqueItems") is True:
        raise SchemaError(f"{_at(path)}'uniqueItems' is not enforced by the grammar engine")
    lengths = sorted({"minLength", "maxLength"} & schema.keys())
    beside = sorted({"pattern", "format"} & schema.keys())
    if lengths and beside:
        raise SchemaError(f"{_at(path)}{lengths[0]!r} beside {beside[0]!r} is not enforced by the grammar engine")
    for word in lengths:
        value = schema[word]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SchemaError(f"{_at(path)}{word!r} must be a non-negative integer, got {value!r}")
    all_of = schema.get("allOf")
    if isinstance(all_of, list) and len(all_of) > 1:
        raise SchemaError(f"{_at(path)}'allOf' with more than one schema is not enforced by the grammar engine")
    required = schema.get("required")
    if isinstance(required, list):
        listed = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        missing = [name for name in required if name not in listed]
        if missing:
            raise SchemaError(f"{_at(path)}required property {missing[0]!r} is not listed in 'properties'")
    for keyword in _SCHEMA:
        if isinstance(schema.get(keyword), (dict, bool)):
            check_enforceable(schema[keyword], _join(path, keyword))
    for keyword in _SCHEMA_LIST:
        if isinstance(schema.get(keyword), list):
            for i, sub in enumerate(schema[keyword]):
                check_enforceable(sub, _join(path, f"{keyword}[{i}]"))
    for keyword in _SCHEMA_MAP:
        if isinstance(schema.get(keyword), dict):
            for name, sub in schema[keyword].items():
                check_enforceable(sub, _join(path, f"{keyword}.{name}"))


def _join(path: str, part: str) -> str:
    return f"{path}.{part}" if path else part


def _at(path: str) -> str:
    return f"at {path}: " if path else ""
