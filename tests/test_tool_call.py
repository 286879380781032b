"""Tool calls are read as literals with ast; anything that would need evaluating is refused with a reason."""
from __future__ import annotations

import pytest

from glmserve.engine.text.chat_format import clean_reply
from glmserve.engine.text.detokenizer import IncrementalDetokenizer
from glmserve.engine.text.tokenizer import ChatGLMTokenizer, embedded_tokenizer_path
from glmserve.engine.text.tool_call import ToolCall, ToolCallParseError, parse_tool_call


def reply(code: str, name: str = "get_weather") -> str:
    """A tool-call reply as the model writes it after ``<|assistant|>``."""
    return f"{name}\n```python\n{code}\n```"


# ---- accepted -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, call", [
    (reply('tool_call(city_name="Beijing")'), ToolCall("get_weather", {"city_name": "Beijing"})),
    (reply("tool_call(seed=42, range=(0, 100))", "random_number_generator"),
     ToolCall("random_number_generator", {"seed": 42, "range": (0, 100)})),
    (reply("tool_call(a=-1, b=+2.5, c=1e-3, d=True, e=None, f='单引号', g=\"\"\"three\nlines\"\"\")", "t"),
     ToolCall("t", {"a": -1, "b": 2.5, "c": 0.001, "d": True, "e": None, "f": "单引号", "g": "three\nlines"})),
    (reply('tool_call(q={"city": "杭州", "days": [1, 2, {"x": [None, False]}]}, tags=["a", ("b", -3)])', "search"),
     ToolCall("search", {"q": {"city": "杭州", "days": [1, 2, {"x": [None, False]}]}, "tags": ["a", ("b", -3)]})),
    (reply("tool_call()", "now"), ToolCall("now", {})),
    (reply("tool_call(\n    city='Paris',\n    units='metric',\n)"),
     ToolCall("get_weather", {"city": "Paris", "units": "metric"})),
    ("  get_weather  \n```python\ntool_call(city='Oslo')\n```\n", ToolCall("get_weather", {"city": "Oslo"})),
    ("get_weather\n```\ntool_call(city='Oslo')\n```", ToolCall("get_weather", {"city": "Oslo"})),
])
def test_reference_format_is_accepted(text, call):
    assert parse_tool_call(text) == call


def test_streamed_reply_parses():
    """A reply decoded token by token (as the engine sees it) parses like the text it encodes."""
    tok = ChatGLMTokenizer.from_file(embedded_tokenizer_path())
    metadata, content = reply('tool_call(city_name="北京", days=3)').split("\n", 1)
    ids = tok.encode(metadata + "\n", add_special_tokens=False) + tok.encode(content, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, strip_reply_prefix=True)
    streamed = "".join(detok.add(i) for i in ids) + detok.flush()
    assert streamed == clean_reply(tok.decode(ids))
    assert parse_tool_call(streamed) == ToolCall("get_weather", {"city_name": "北京", "days": 3})


# ---- refused ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, reason", [
    # the frame around the call
    ("\n tool_call(x=1)", "no tool name"),
    ("```python\ntool_call(x=1)\n```", "no tool name"),
    ("get_weather", "no code block"),
    ("get_weather\ntool_call(city='x')", "missing opening ``` fence"),
    ("get_weather\n```python\ntool_call(city='x')", "missing closing ``` fence"),
    # not one tool_call(...) expression
    (reply("tool_call(city='x'"), "not valid Python"),
    (reply("import os"), "found an import statement"),
    (reply("from os import system"), "found an import statement"),
    (reply("x = tool_call(a=1)"), "found an assignment"),
    (reply("tool_call(a=1)\ntool_call(b=2)"), "found 2 statements"),
    (reply(""), "found 0 statements"),
    (reply("def tool_call(**kw):\n    return kw"), "found a function definition"),
    (reply("lambda: 0"), "found a lambda"),
    (reply("'just a string'"), "must be a call to tool_call"),
    (reply("__import__('os').system('rm -rf /')"), "must call tool_call, not \"__import__('os').system\""),
    (reply("eval('1')"), "must call tool_call, not 'eval'"),
    (reply("tools.tool_call(a=1)"), "must call tool_call, not 'tools.tool_call'"),
    # arguments that are not plain keyword literals
    (reply("tool_call('Beijing')"), "positional arguments are not allowed"),
    (reply("tool_call(*cities)"), "positional arguments are not allowed"),
    (reply("tool_call(**kwargs)"), "cannot use ** unpacking"),
    (reply("tool_call(a=1, a=2)"), "'a' is given twice"),
    (reply("tool_call(city=city)"), "'city' is not a literal: it contains a variable name"),
    (reply("tool_call(path=os.environ)"), "contains attribute access"),
    (reply("tool_call(x=__import__('os'))"), "contains a function call"),
    (reply("tool_call(x=[1, open('/etc/passwd')])"), "contains a function call"),
    (reply("tool_call(f=lambda: 0)"), "contains a lambda"),
    (reply("tool_call(s=f'{secret}')"), "contains an f-string"),
    (reply("tool_call(n=2 ** 100000)"), "contains an arithmetic expression"),
    (reply("tool_call(z=1 + 2j)"), "contains an arithmetic expression"),
    (reply("tool_call(x=[i for i in range(9)])"), "contains a comprehension"),
    (reply("tool_call(x=a[0])"), "contains a subscript"),
    (reply("tool_call(x=1 if y else 2)"), "contains a conditional expression"),
    (reply("tool_call(x=(y := 1))"), "contains an assignment expression"),
    (reply("tool_call(x={1, 2})"), "contains a set"),
    (reply("tool_call(x=not 1)"), "contains a `not` operator"),
    (reply("tool_call(x=-'a')"), "a sign applies only to a number"),
    (reply("tool_call(x=b'raw')"), "contains b'raw', which is not a string, number, boolean or None"),
    (reply("tool_call(x=...)"), "contains ..., which is not a string"),
    (reply("tool_call(x=" + "[" * 500 + "]" * 500 + ")"), "not valid Python"),
])
def test_code_is_refused_with_a_reason(text, reason):
    with pytest.raises(ToolCallParseError) as info:
        parse_tool_call(text)
    assert reason in str(info.value)


def test_nothing_is_evaluated(tmp_path):
    """Code that would leave a trace under eval() is refused without running."""
    flag = tmp_path / "evaluated"
    for code in (f"tool_call(x=open({str(flag)!r}, 'w'))", f"open({str(flag)!r}, 'w')",
                 f"tool_call(x=[1, {{'k': open({str(flag)!r}, 'w')}}])"):
        with pytest.raises(ToolCallParseError):
            parse_tool_call(reply(code))
    assert not flag.exists()
