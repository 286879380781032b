"""Structured outputs as the HTTP API spells them, onto the engine's one ``StructuredOutput``.

Three spellings, each naming one of the engine's kinds (json_schema, json_object, regex, choice, grammar):

- OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``, or
  ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``. The schema is always enforced, as
  the grammar engine does it: ``strict`` false asks for no less.
- vLLM's ``structured_outputs`` (vLLM >= 0.10, sent through ``extra_body``): an object with one of ``json``,
  ``regex``, ``choice``, ``grammar`` or ``json_object``. Its flags that cannot change a valid answer here are
  accepted (glmserve always writes compact JSON, never lets extra properties through, and has no fallback
  backend); those asking for what is not served (``structural_tag``, ``whitespace_pattern``) are refused.
- vLLM's older top-level fields ``guided_json``, ``guided_regex``, ``guided_choice``, ``guided_grammar``.

Only the mapping lives here. What the values must be (a non-empty regex, a schema the grammar engine enforces, a
grammar that parses) is checked by the engine's own code, the same the gRPC API runs (``StructuredOutput.check``,
then ``structured.grammars.check_structured`` in ``AsyncEngine.generate``); its errors name the engine's field
(``structured.regex``), which :func:`field_names` maps back to the field the client sent.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glmserve.engine.core.sampling_params import StructuredOutput
from glmserve.engine.entrypoints.http.errors import bad_request
from glmserve.engine.entrypoints.http.protocol import SamplingFields

# vLLM's names -> the engine's kinds.
STRUCTURED_OUTPUTS_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar",
                           "json_object": "json_object"}
GUIDED_FIELDS = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
                 "guided_grammar": "grammar"}
# structured_outputs flags that cannot make a served answer invalid: accepted, no effect.
_HARMLESS_FLAGS = ("disable_fallback", "disable_any_whitespace", "disable_additional_properties")
_REFUSED_KEYS = {"structural_tag": "structural tags are not supported",
                 "whitespace_pattern": "JSON is always written compactly; a whitespace pattern is not supported"}
RESPONSE_FORMAT_TYPES = ("text", "json_object", "json_schema")


@dataclass(frozen=True)
class Constraint:
    """One constraint as the request gave it."""

    param: str          # where the request holds it, e.g. "response_format.json_schema.schema"
    kind: str           # the StructuredOutput field it sets
    value: Any


def constraints(body: SamplingFields) -> list[Constraint]:
    """Every constraint the request sets, in every spelling (bad shapes are a 400 naming the field)."""
    found = []
    if body.response_format is not None:
        found += _response_format(body.response_format)
    if body.structured_outputs is not None:
        found += _structured_outputs(body.structured_outputs)
    for name, kind in GUIDED_FIELDS.items():
        value = getattr(body, name)
        if value is not None:
            found.append(Constraint(name, kind, value))
    return found


def structured_output(body: SamplingFields) -> StructuredOutput | None:
    """The request's constraint as the engine takes it, or None; more than one is a 400 naming them."""
    found = constraints(body)
    if not found:
        return None
    if len(found) > 1:
        names = ", ".join(c.param for c in found)
        raise bad_request(found[1].param, f"{found[1].param}: a request takes one structured-output constraint, "
                          f"got {len(found)}: {names}")
    (constraint,) = found
    return StructuredOutput(**{constraint.kind: constraint.value})


def field_names(body: SamplingFields) -> dict[str, str]:
    """The engine's ``structured.*`` field names as this request spells them (for its error messages)."""
    try:
        found = constraints(body)
    except Exception:  # noqa: BLE001 - a malformed constraint is reported by structured_output
        return {}
    if len(found) != 1:
        return {}
    param = found[0].param
    return {"structured": param, f"structured.{found[0].kind}": param}


def _response_format(value: dict) -> list[Constraint]:
    kind = value.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise bad_request("response_format.type", f"response_format.type: must be one of "
                          f"{', '.join(RESPONSE_FORMAT_TYPES)}, got {kind!r}")
    if kind == "text":
        return []
    if kind == "json_object":
        return [Constraint("response_format", "json_object", True)]
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad_request("response_format.json_schema", "response_format.json_schema: must be an object "
                          f"with the schema's name and schema, got {type(spec).__name__}")
    if not isinstance(spec.get("name", ""), str):
        raise bad_request("response_format.json_schema.name", "response_format.json_schema.name: must be a string")
    if not isinstance(spec.get("strict", False), (bool, type(None))):
        raise bad_request("response_format.json_schema.strict",
                          "response_format.json_schema.strict: must be a boolean")
    if "schema" not in spec:
        raise bad_request("response_format.json_schema.schema", "response_format.json_schema.schema: required")
    schema = spec["schema"]
    if not isinstance(schema, dict):   # OpenAI takes an object; JSON text would be a client's mistake here
        raise bad_request("response_format.json_schema.schema", "response_format.json_schema.schema: must be "
                          f"a JSON Schema object, got {type(schema).__name__}")
    return [Constraint("response_format.json_schema.schema", "json_schema", schema)]


def _structured_outputs(value: dict) -> list[Constraint]:
    found = []
    for key, item in value.items():
        where = f"structured_outputs.{key}"
        if key in _REFUSED_KEYS:
            if item is not None:
                raise bad_request(where, f"{where}: {_REFUSED_KEYS[key]}")
        elif key in _HARMLESS_FLAGS:
            if not isinstance(item, (bool, type(None))):
                raise bad_request(where, f"{where}: must be a boolean")
        elif key not in STRUCTURED_OUTPUTS_KEYS:
            raise bad_request(where, f"{where}: unknown; structured_outputs takes one of "
                              f"{', '.join(STRUCTURED_OUTPUTS_KEYS)}")
        elif item is not None and not (key == "json_object" and item is False):
            found.append(Constraint(where, STRUCTURED_OUTPUTS_KEYS[key], item))
    if not found:
        raise bad_request("structured_outputs", "structured_outputs: set one of "
                          f"{', '.join(STRUCTURED_OUTPUTS_KEYS)}")
    return found
