"""Tool calls that always parse: the grammar of a ChatGLM3 tool-call reply.

With ``tool_choice`` "required" (any of the tools) or naming one tool, the reply is constrained to the form
``engine/text/tool_call.py`` parses::

    get_weather
    ```python
    tool_call(city="Beijing", days=3)
    ```

then <|observation|>, with keyword arguments that are valid for the tool's parameter schema (python_literal.py).
The reference tokenization puts a dummy-prefix space before the tool name and before the code block (each is
encoded on its own), so the grammar allows one there: the model may write what it was trained on, and the parser
strips it. "auto" leaves the reply free.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from glmserve.engine.core.errors import RequestError
from glmserve.engine.core.sampling_params import StructuredOutput
from glmserve.engine.structured.python_literal import PythonLiteralGrammar, SchemaGrammarError, ebnf_string

TOOL_CHOICE_MODES = ("auto", "required")


@dataclass(frozen=True)
class ToolChoice:
    """OpenAI's tool_choice: "auto" (free reply), "required" (some tool call), or one named function."""

    mode: str = "auto"
    function: str | None = None

    @classmethod
    def named(cls, function: str) -> "ToolChoice":
        return cls("function", function)


def tool_call_output(tools: Any, choice: ToolChoice) -> StructuredOutput | None:
    """The structured output that forces a tool call, or None when the reply stays free ("auto").

    Raises RequestError naming ``tool_choice`` or ``tools``.
    """
    if choice.mode == "auto":
        return None
    if choice.mode not in ("required", "function"):
        raise RequestError("tool_choice", f"must be one of {', '.join(TOOL_CHOICE_MODES)} or a function name, "
                           f"got {choice.mode!r}")
    if tools is None:
        raise RequestError("tool_choice", f"{choice.mode!r} needs tools")
    specs = _tool_specs(tools)
    if choice.mode == "function":
        if not isinstance(choice.function, str) or not choice.function:
            raise RequestError("tool_choice", "the function name is empty")
        specs = [s for s in specs if s[0] == choice.function]
        if not specs:
            raise RequestError("tool_choice", f"no tool is named {choice.function!r}")
    return StructuredOutput(tool_call=tool_call_ebnf(specs))


def tool_call_ebnf(specs: list[tuple[str, Any]]) -> str:
    """EBNF of a reply calling one of the tools, given as (name, parameter schema) pairs."""
    rules, calls = {}, []
    for i, (name, parameters) in enumerate(specs):
        grammar = PythonLiteralGrammar(parameters, where=f"tools[{name!r}].parameters", prefix=f"t{i}")
        try:
            arguments = grammar.keyword_arguments(parameters, "")
        except SchemaGrammarError as exc:
            raise RequestError("tools", str(exc)) from None
        rules.update(grammar.rules)
        calls.append(f'{ebnf_string(name + chr(10))} " "? "```python\\ntool_call(" {arguments} ")\\n```"')
    lines = ['root ::= " "? call', "call ::= " + " | ".join(f"({c})" for c in calls)]
    return "\n".join(lines + [f"{name} ::= {body}" for name, body in rules.items()])


def _tool_specs(tools: Any) -> list[tuple[str, Any]]:
    """(name, parameters) of each tool, in ChatGLM3's form {"name", "parameters", ...} or OpenAI's
    {"type": "function", "function": {...}}."""
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list) or not tools:
        raise RequestError("tools", "a forced tool call needs a non-empty list of tools")
    specs = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            tool = tool["function"]
        if not isinstance(tool, dict):
            raise RequestError("tools", f"tools[{i}] must be an object with a name and parameters")
        name = tool.get("name")
        if not isinstance(name, str) or not name or name != name.strip() or "\n" in name:
            raise RequestError("tools", f"tools[{i}] needs a name: a non-empty string on one line without "
                               f"surrounding spaces, got {name!r}")
        specs.append((name, tool.get("parameters")))
    return specs
