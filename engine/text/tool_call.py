"""ChatGLM3 tool calls, parsed without evaluating anything.

A tool-call reply is the tool name on the metadata line, then a fenced block holding one call::

    get_weather
    ```python
    tool_call(city_name="Beijing")
    ```

The reference demo ``eval()``s the block, which runs whatever the model (or a prompt injection) wrote. Here the
block is parsed with ``ast`` and accepted only as a single ``tool_call(...)`` with keyword arguments whose values
are literals, each read with ``ast.literal_eval``.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from typing import Any

FENCE = "```"


class ToolCallParseError(ValueError):
    """A reply that is not a well-formed, literal-only ChatGLM3 tool call."""


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def parse_tool_call(reply_text: str) -> ToolCall:
    """The tool call in a decoded reply (tool name line, then the fenced ``tool_call(...)``)."""
    name, sep, body = reply_text.partition("\n")
    name = name.strip()
    if not name or name.startswith(FENCE):  # an empty metadata line marks a plain reply, not a call
        raise ToolCallParseError("tool call has no tool name on its first line")
    if not sep:
        raise ToolCallParseError(f"tool call {name!r} has no code block after the tool name")
    lines = body.strip().split("\n")
    if not lines[0].strip().startswith(FENCE):
        raise ToolCallParseError(f"tool call {name!r}: missing opening ``` fence")
    if len(lines) < 2 or lines[-1].strip() != FENCE:
        raise ToolCallParseError(f"tool call {name!r}: missing closing ``` fence")
    return ToolCall(name, _parse_arguments("\n".join(lines[1:-1])))


def _parse_arguments(code: str) -> dict[str, Any]:
    try:
        module = ast.parse(code, mode="exec")
    except SyntaxError as exc:
        raise ToolCallParseError(f"tool call code is not valid Python: {exc.msg}") from None
    except ValueError as exc:  # e.g. NUL bytes in the source
        raise ToolCallParseError(f"tool call code is not valid Python: {exc}") from None
    except RecursionError:
        raise ToolCallParseError("tool call code is nested too deeply") from None
    if len(module.body) != 1:
        raise ToolCallParseError("tool call code must be one tool_call(...) expression, "
                                 f"found {len(module.body)} statements")
    statement = module.body[0]
    if not isinstance(statement, ast.Expr):
        raise ToolCallParseError(f"tool call code must be one tool_call(...) expression, found {_describe(statement)}")
    call = statement.value
    if not isinstance(call, ast.Call):
        raise ToolCallParseError(f"tool call code must be a call to tool_call(...), found {_describe(call)}")
    if not (isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ToolCallParseError(f"tool call code must call tool_call, not {_source(call.func)!r}")
    if call.args:
        raise ToolCallParseError("tool_call takes keyword arguments only; positional arguments are not allowed")
    arguments: dict[str, Any] = {}
    for keyword in call.keywords:
        if keyword.arg is None:
            raise ToolCallParseError("tool_call arguments cannot use ** unpacking")
        if keyword.arg in arguments:  # legal to parse, an error only when Python compiles the call
            raise ToolCallParseError(f"tool_call argument {keyword.arg!r} is given twice")
        arguments[keyword.arg] = _literal(keyword.arg, keyword.value)
    return arguments


# What an argument may be built from: JSON-like values (plus tuples, and signs on numbers). Anything else is code
# or a value no tool expects (bytes, sets, complex, ...), and is named in the error.
_LITERAL_NODES = (ast.Constant, ast.List, ast.Tuple, ast.Dict, ast.UnaryOp, ast.UAdd, ast.USub, ast.expr_context)
_CONSTANT_TYPES = (str, int, float, bool, type(None))


def _literal(name: str, node: ast.expr) -> Any:
    for sub in ast.walk(node):
        if not isinstance(sub, _LITERAL_NODES):
            raise ToolCallParseError(f"tool_call argument {name!r} is not a literal: it contains {_describe(sub)}")
        if isinstance(sub, ast.Constant) and not isinstance(sub.value, _CONSTANT_TYPES):
            raise ToolCallParseError(f"tool_call argument {name!r} contains {_source(sub)}, which is not a "
                                     "string, number, boolean or None")
        if isinstance(sub, ast.UnaryOp) and not (isinstance(sub.operand, ast.Constant)
                                                 and type(sub.operand.value) in (int, float)):
            raise ToolCallParseError(f"tool_call argument {name!r} is not a literal: a sign applies only to a number")
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError) as exc:
        raise ToolCallParseError(f"tool_call argument {name!r} is not a literal: {exc}") from None


_DESCRIPTIONS = {
    ast.Name: "a variable name", ast.Attribute: "attribute access", ast.Call: "a function call",
    ast.Lambda: "a lambda", ast.JoinedStr: "an f-string", ast.FormattedValue: "an f-string",
    ast.Subscript: "a subscript", ast.Starred: "* unpacking", ast.BinOp: "an arithmetic expression",
    ast.BoolOp: "a boolean expression", ast.Compare: "a comparison", ast.IfExp: "a conditional expression",
    ast.NamedExpr: "an assignment expression", ast.Await: "await", ast.Yield: "yield", ast.YieldFrom: "yield",
    ast.ListComp: "a comprehension", ast.SetComp: "a comprehension", ast.DictComp: "a comprehension",
    ast.GeneratorExp: "a generator expression", ast.Set: "a set", ast.Import: "an import statement",
    ast.ImportFrom: "an import statement", ast.Assign: "an assignment", ast.AugAssign: "an assignment",
    ast.AnnAssign: "an assignment", ast.FunctionDef: "a function definition",
    ast.AsyncFunctionDef: "a function definition", ast.ClassDef: "a class definition",
    ast.Not: "a `not` operator", ast.Invert: "a `~` operator",
}


def _source(node: ast.AST, limit: int = 60) -> str:
    """The node's source, cut short so a hostile reply cannot flood the error message."""
    text = ast.unparse(node)
    return text if len(text) <= limit else text[:limit] + "..."


def _describe(node: ast.AST) -> str:
    return _DESCRIPTIONS.get(type(node), f"a {type(node).__name__} node")
