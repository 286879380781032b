"""Structured outputs below the engine: the vocabulary xgrammar is told about, grammar building and its refusals,
integer ranges and the Python-literal grammar of tool calls (checked against brute force, ``ast`` and jsonschema).
"""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

xgr = pytest.importorskip("xgrammar")
jsonschema = pytest.importorskip("jsonschema")

from glmserve.engine.core.errors import RequestError  # noqa: E402
from glmserve.engine.core.sampling_params import SamplingParams, SamplingParamsError, StructuredOutput  # noqa: E402
from glmserve.engine.structured.bitmask import TokenBitmask  # noqa: E402
from glmserve.engine.structured.grammars import build_grammar, cache_key  # noqa: E402
from glmserve.engine.structured.int_range import integer_range_ebnf  # noqa: E402
from glmserve.engine.structured.tool_call_grammar import ToolChoice, tool_call_output  # noqa: E402
from glmserve.engine.structured.vocabulary import grammar_vocabulary, tokenizer_info  # noqa: E402
from glmserve.engine.text.tokenizer import ChatGLMTokenizer, embedded_tokenizer_path  # noqa: E402
from glmserve.engine.text.tool_call import parse_tool_call  # noqa: E402

# A character-level vocabulary (one token per printable ASCII character, newline, then a stop token): enough to
# test what a grammar accepts, independent of any SentencePiece model.
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
STOP = len(CHARS)


@pytest.fixture(scope="module")
def char_compiler():
    info = xgr.TokenizerInfo(CHARS + [""], vocab_size=len(CHARS) + 1, stop_token_ids=[STOP])
    return xgr.GrammarCompiler(info, cache_enabled=False)


def accepts(compiled, text: str) -> bool:
    """Whether ``text`` is a complete sentence of the grammar."""
    matcher = xgr.GrammarMatcher(compiled)
    return matcher.accept_string(text) and matcher.accept_token(STOP)


def random_sentence(compiled, rng: random.Random, max_len: int = 400) -> str | None:
    """A uniformly random walk through the grammar, token by token (None if it runs past ``max_len``)."""
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, len(CHARS) + 1)
    text = []
    for _ in range(max_len):
        matcher.fill_next_token_bitmask(bitmask)
        words = bitmask.numpy().view(np.uint32)[0]
        allowed = [t for t in range(len(CHARS) + 1) if (int(words[t >> 5]) >> (t & 31)) & 1]
        token = rng.choice(allowed)
        assert matcher.accept_token(token)
        if token == STOP:
            return "".join(text)
        text.append(CHARS[token])
    return None


# ---- integer ranges ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("low,high", [(0, 0), (-5, 120), (1, 12), (None, 3), (-3, None), (None, None), (-120, -7),
                                      (13, 2047), (95, 1005), (-1, 1), (100, None)])
def test_integer_range_matches_exactly_the_integers_in_range(char_compiler, low, high):
    compiled = char_compiler.compile_grammar(xgr.Grammar.from_ebnf("root ::= " + integer_range_ebnf(low, high)))
    for n in range(-2100, 2100):
        inside = (low is None or n >= low) and (high is None or n <= high)
        assert accepts(compiled, str(n)) == inside, n
    for junk in ("-0", "00", "01", "-01", "", "-", "+1", "1.0"):
        assert not accepts(compiled, junk), junk


def test_an_empty_integer_range_is_refused():
    with pytest.raises(ValueError):
        integer_range_ebnf(5, 4)


# ---- the vocabulary xgrammar is told about ----------------------------------------------------------------------
def test_the_chatglm3_vocabulary_is_described_exactly(real_tokenizer):
    tok = real_tokenizer
    vocab = grammar_vocabulary(tok, 65024)
    info = tokenizer_info(vocab)
    decoded = info.decoded_vocab
    assert len(vocab.encoded) == tok.vocab_size == 64798
    assert decoded[13] == b"\n" and decoded[3 + 0x20] == b" " and decoded[3 + 0xE4] == b"\xe4"   # byte pieces
    assert decoded[tok.encode("a the", add_special_tokens=False)[1]] == b" the"                 # "▁" is a space
    # <unk>, <s>, the nine special tokens and the padding up to 65024 are never text; eos is the one stop token.
    never_text = [0, 1, *range(64789, 65024)]
    assert set(never_text) <= set(info.special_token_ids)
    assert info.stop_token_ids == [2]
    # A grammar that allows any text lets none of them through, at any point.
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    matcher = xgr.GrammarMatcher(compiler.compile_regex(r"[\s\S]*"))
    bitmask = xgr.allocate_token_bitmask(1, 65024)
    for text in ("", "hello ", "你"):
        assert matcher.accept_string(text)
        matcher.fill_next_token_bitmask(bitmask)
        words = bitmask.numpy().view(np.uint32)[0]
        allowed = {t for t in range(65024) if (int(words[t >> 5]) >> (t & 31)) & 1}
        assert not allowed & set(never_text)
        assert 2 in allowed and tok.encode("hello", add_special_tokens=False)[0] in allowed


def test_the_first_token_mask_clears_exactly_the_pieces_that_start_with_a_space():
    tok = ChatGLMTokenizer.from_file(embedded_tokenizer_path())
    vocab = grammar_vocabulary(tok, 4096)
    pieces = tok.text_pieces()
    bits = np.unpackbits(vocab.no_leading_space.view(np.uint8), bitorder="little")
    for token_id in range(4096):
        starts_with_space = token_id < len(pieces) and (pieces[token_id] or "").startswith("\u2581")
        assert bits[token_id] == (not starts_with_space), token_id
    # Why: SentencePiece drops that space when the piece comes first, so the client would not get the matched text.
    the = tok.encode("a the", add_special_tokens=False)[1]
    assert tok.decode([the]) == "the" and tok.decode([13, the]) == "\n the"


# ---- building grammars, and refusing bad ones -------------------------------------------------------------------
@pytest.mark.parametrize("spec,field,words", [
    (StructuredOutput(json_schema='{"type": "objekt"}'), "structured.json_schema", "objekt"),
    (StructuredOutput(json_schema="{not json"), "structured.json_schema", "not valid JSON"),
    (StructuredOutput(json_schema="[1, 2]"), "structured.json_schema", "JSON object"),
    (StructuredOutput(json_schema={"oneOf": [{"type": "integer"}, {"type": "number"}]}), "structured.json_schema",
     "oneOf"),
    (StructuredOutput(json_schema={"type": "object", "properties": {"a": {"not": {"type": "null"}}}}),
     "structured.json_schema", "properties.a"),
    (StructuredOutput(json_schema={"type": "object", "properties": {}, "required": ["b"]}),
     "structured.json_schema", "'b'"),
    (StructuredOutput(json_schema={"type": "string", "maxLength": 3, "pattern": "^a+$"}),
     "structured.json_schema", "maxLength"),
    (StructuredOutput(json_schema={"type": "array", "uniqueItems": True}), "structured.json_schema", "uniqueItems"),
    (StructuredOutput(regex="(ab"), "structured.regex", "parenthesis"),
    (StructuredOutput(regex="[a-"), "structured.regex", "["),
    (StructuredOutput(grammar='root ::= "a'), "structured.grammar", "string literal"),
    (StructuredOutput(grammar='start ::= "a"'), "structured.grammar", "root"),
    (StructuredOutput(grammar='root ::= undefined_rule'), "structured.grammar", "undefined_rule"),
    (StructuredOutput(tool_call='root ::= "x"'), "structured.tool_call", "chat"),
])
def test_bad_grammars_are_refused_naming_the_problem(spec, field, words):
    with pytest.raises(SamplingParamsError) as info:
        build_grammar(spec, chat=False)
    assert info.value.field == field
    assert str(info.value).startswith(field + ":") and words in str(info.value)
    assert "/project/cpp" not in str(info.value)   # xgrammar's source location is cut off


@pytest.mark.parametrize("spec,field", [
    (StructuredOutput(), "structured"),
    (StructuredOutput(regex="a", grammar="root ::= \"a\""), "structured"),
    (StructuredOutput(regex=""), "structured.regex"),
    (StructuredOutput(regex=5), "structured.regex"),
    (StructuredOutput(choice=[]), "structured.choice"),
    (StructuredOutput(choice="yes"), "structured.choice"),
    (StructuredOutput(choice=["a", ""]), "structured.choice"),
    (StructuredOutput(json_schema=3), "structured.json_schema"),
    (StructuredOutput(json_object=1), "structured.json_object"),
])
def test_sampling_params_check_the_types_cheaply(spec, field):
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(structured=spec).validate(vocab_size=100)
    assert info.value.field == field


def test_sampling_params_take_only_a_structured_output():
    with pytest.raises(SamplingParamsError) as info:
        SamplingParams(structured={"regex": "a"}).validate(vocab_size=100)
    assert info.value.field == "structured"


def test_the_json_grammars_write_only_json_their_schema_accepts(char_compiler):
    """Random walks through each grammar (every path equally likely at each step) give text that parses and
    validates; the length-bounded strings are the case xgrammar 0.2.9 gets wrong without the rewrite."""
    schemas = [
        {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 3},
                                          "n": {"type": "number", "minimum": -1.5, "maximum": 2},
                                          "e": {"enum": ["x", 1, None, True]}}, "required": ["s", "n"]},
        {"type": "array", "items": {"type": "integer", "exclusiveMinimum": -3, "maximum": 40}, "maxItems": 4},
        {"type": "object", "properties": {"p": {"$ref": "#/$defs/p"}}, "required": ["p"],
         "$defs": {"p": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 2}]}}},
    ]
    rng = random.Random(0)
    for schema in schemas:
        compiled = char_compiler.compile_grammar(build_grammar(StructuredOutput(json_schema=schema), chat=False))
        sentences = [s for s in (random_sentence(compiled, rng) for _ in range(60)) if s is not None]
        assert len(sentences) > 30
        for text in sentences:
            jsonschema.validate(json.loads(text), schema)
    # A raw control character inside a length-bounded string would make the JSON invalid (xgrammar allows it
    # there unless the bound is rewritten); the rewrite writes only characters that need no escape.
    compiled = char_compiler.compile_grammar(build_grammar(
        StructuredOutput(json_schema={"type": "string", "maxLength": 4}), chat=False))
    assert not xgr.GrammarMatcher(compiled).accept_string('"a\n')
    assert not xgr.GrammarMatcher(compiled).accept_string('"a\\')
    assert accepts(compiled, '"a b"') and not accepts(compiled, '"abcde"')


def test_a_chat_grammar_covers_the_content_after_the_reply_prefix(char_compiler):
    spec = StructuredOutput(choice=["yes", "no"])
    compiled = char_compiler.compile_grammar(build_grammar(spec, chat=True))
    assert accepts(compiled, "\n yes") and not accepts(compiled, "yes") and not accepts(compiled, "\nyes")
    assert cache_key(spec, chat=True) != cache_key(spec, chat=False)


def test_choices_are_matched_literally(char_compiler):
    spec = StructuredOutput(choice=['say "hi"', "a\\b", "x|y", "(z)*"])
    compiled = char_compiler.compile_grammar(build_grammar(spec, chat=False))
    for choice in spec.choice:
        assert accepts(compiled, choice)
    for other in ('say "hi', "x", "zz", "(z)", "a\\\\b"):
        assert not accepts(compiled, other)


# ---- tool calls --------------------------------------------------------------------------------------------------
WEATHER = {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 8},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "threshold": {"type": "number", "minimum": -2.5, "exclusiveMaximum": 3},
        "alerts": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 3},
        "hours": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 23}, "maxItems": 3},
        "where": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                   "tree": {"$ref": "#/$defs/tree"}}, "required": ["lat"]},
        "extra": {"type": "object", "additionalProperties": {"type": "boolean"}},
    },
    "required": ["city", "days"],
    "$defs": {"tree": {"type": "array", "items": {"$ref": "#/$defs/tree"}, "maxItems": 2}},
}}
CLOCK = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}


def test_forced_tool_calls_parse_and_their_arguments_validate(char_compiler):
    spec = tool_call_output([WEATHER, CLOCK], ToolChoice("required"))
    compiled = char_compiler.compile_grammar(xgr.Grammar.from_ebnf(spec.tool_call))
    rng = random.Random(1)
    names = set()
    sentences = [s for s in (random_sentence(compiled, rng, 600) for _ in range(150)) if s is not None]
    assert len(sentences) > 100
    for text in sentences:
        call = parse_tool_call(text)
        names.add(call.name)
        schema = WEATHER["parameters"] if call.name == "get_weather" else CLOCK["function"]["parameters"]
        jsonschema.validate(call.arguments, schema)
    assert names == {"get_weather", "now"}


def test_a_named_tool_call_writes_that_tool_in_python_syntax(char_compiler):
    spec = tool_call_output([WEATHER, CLOCK], ToolChoice.named("get_weather"))
    compiled = char_compiler.compile_grammar(xgr.Grammar.from_ebnf(spec.tool_call))
    good = ('get_weather\n```python\ntool_call(city="Paris", days=3, unit="celsius", threshold=-1.25, alerts=True, '
            'note=None, hours=[0, 23], where={"lat": -90, "tree": [[], [[]]]}, extra={"k": False})\n```')
    assert accepts(compiled, good) and accepts(compiled, ' get_weather\n ```python\ntool_call(city="x", days=1)\n```')
    assert parse_tool_call(good).arguments["where"] == {"lat": -90, "tree": [[], [[]]]}
    for bad in [good.replace("True", "true"), good.replace("None", "null"), good.replace("days=3", "days=15"),
                'get_weather\n```python\ntool_call(days=1)\n```',                     # city is required
                'now\n```python\ntool_call()\n```',                                  # another tool
                'get_weather\n```python\ntool_call(days=1, city="x")\n```',          # declared order
                'get_weather\n```python\ntool_call(city="x", days=1, other=2)\n```',
                'get_weather\n```python\ntool_call(city="a\\/b", days=1)\n```']:     # JSON-only escape
        assert not accepts(compiled, bad), bad


@pytest.mark.parametrize("tools,choice,field,words", [
    (None, ToolChoice("required"), "tool_choice", "needs tools"),
    ([WEATHER], ToolChoice.named("missing"), "tool_choice", "'missing'"),
    ([WEATHER], ToolChoice("none"), "tool_choice", "'none'"),
    ([{"description": "no name"}], ToolChoice("required"), "tools", "name"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "string", "pattern": "a"}}}}],
     ToolChoice("required"), "tools", "'pattern'"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"my-arg": {"type": "integer"}}}}],
     ToolChoice("required"), "tools", "not a Python identifier"),
    ([{"name": "f", "parameters": {"type": "object", "properties": {"x": {"oneOf": []}}}}],
     ToolChoice("required"), "tools", "'oneOf'"),
    ([{"name": "f", "parameters": {"type": "array"}}], ToolChoice("required"), "tools", "object schema"),
])
def test_tool_choice_errors_name_the_field(tools, choice, field, words):
    with pytest.raises(RequestError) as info:
        tool_call_output(tools, choice)
    assert info.value.field == field and words in str(info.value)


def test_auto_leaves_the_reply_free():
    assert tool_call_output([WEATHER], ToolChoice("auto")) is None


# ---- the mask in the sampler ---------------------------------------------------------------------------------------
def _random_bits(rng: np.random.Generator, batch: int, width: int, density: float) -> torch.Tensor:
    allowed = rng.random((batch, -(-width // 32) * 32)) < density
    return torch.from_numpy(np.packbits(allowed, axis=1, bitorder="little").view(np.int32).copy())


@pytest.mark.parametrize("width", [4096, 65024, 1000])
def test_the_cpu_mask_agrees_with_xgrammars_kernel(width):
    rng = np.random.default_rng(width)
    bits = _random_bits(rng, 9, width, 0.3)
    logits = torch.randn(9, width)
    reference = logits.clone()
    xgr.apply_token_bitmask_inplace(reference, bits, vocab_size=width)
    for rows in (list(range(9)), [0, 4, 8]):
        mask = TokenBitmask(bits, rows)
        got = mask.masked(logits) if len(rows) == 9 else mask.masked_rows(logits)
        want = reference if len(rows) == 9 else reference[rows]
        banned = torch.isinf(want)
        assert torch.equal(got < -1e29, banned) and torch.equal(got[~banned], want[~banned])
    assert torch.equal(logits, logits.clone())   # the input is untouched


@pytest.mark.parametrize("params", [
    dict(temperature=0.0),
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.01, repetition_penalty=1.3, presence_penalty=0.5),
    dict(temperature=1.0, logprobs=5, min_tokens=10),
])
def test_the_sampler_draws_only_allowed_tokens_and_leaves_free_rows_alone(params):
    from glmserve.engine.worker.sampler import Sampler, SamplingRow
    rng = np.random.default_rng(0)
    width, vocab = 4096, 4000
    sampler = Sampler(vocab, eos_token_id=2)
    for trial in range(20):
        bits = _random_bits(rng, 4, width, 0.002)
        bits[1] = -1                                   # row 1 is free
        logits = torch.randn(4, width) * 5
        rows = [SamplingRow(SamplingParams(**params), [5, 6], [7]) for _ in range(4)]
        out = sampler(logits, rows, TokenBitmask(bits, [0, 2, 3]))
        words = bits.numpy().view(np.uint32)
        for i in (0, 2, 3):
            allowed = {t for t in range(vocab) if (int(words[i, t >> 5]) >> (t & 31)) & 1}
            if allowed:
                assert out.token_ids[i] in allowed
            if params.get("logprobs"):
                assert all(t in allowed or lp == float("-inf") for t, lp in out.top_logprobs[i])
        if params["temperature"] == 0.0:
            assert out.token_ids[1] == int(logits[1, :vocab].argmax())
