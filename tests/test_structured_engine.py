"""Structured outputs through the whole engine, on the random-weight glm-tiny model.

Free, its replies are gibberish at temperature 1.0 (checked below), so every constrained reply that parses and
validates is the engine's doing. Outputs are checked with independent readers: ``json`` + ``jsonschema``, ``re``,
and ``ast`` (the tool-call parser), never with the grammar engine itself.
"""
from __future__ import annotations

import json
import re
import threading

import pytest

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

from glmserve.engine.core.outputs import RequestOutput  # noqa: E402
from glmserve.engine.core.sampling_params import SamplingParams, StructuredOutput  # noqa: E402
from glmserve.engine.entrypoints.chat import ChatTemplate  # noqa: E402
from glmserve.engine.structured.tool_call_grammar import ToolChoice, tool_call_output  # noqa: E402
from glmserve.engine.text.chat_format import ChatMessage, build_chat_prompt  # noqa: E402
from glmserve.engine.text.tool_call import parse_tool_call  # noqa: E402

from .engine_helpers import assert_no_leaks, make_engine, random_prompts  # noqa: E402

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9999},
                                                  "name": {"type": "string", "minLength": 1, "maxLength": 6}},
                 "required": ["id", "name"]},
        "active": {"type": "boolean"}}, "required": ["user", "active"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50}, "minItems": 1,
              "maxItems": 5},
    "enums": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                               "size": {"enum": ["S", "M", "L", None]}}, "required": ["color"]},
    "bounded": {"type": "object", "properties": {"celsius": {"type": "number", "minimum": -10.5, "maximum": 40},
                                                 "humidity": {"type": "integer", "exclusiveMinimum": 0,
                                                              "exclusiveMaximum": 100}},
                "required": ["celsius", "humidity"]},
    "optional": {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 5}, "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
        "rating": {"type": "number", "minimum": 0, "maximum": 5},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3}},
        "required": ["title"]},
    "refs": {"type": "object", "properties": {"point": {"$ref": "#/$defs/point"},
                                              "label": {"anyOf": [{"type": "string", "maxLength": 4},
                                                                  {"type": "null"}]}},
             "required": ["point", "label"],
             "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0,
                                                                          "maximum": 9},
                                                                  "y": {"type": "integer", "minimum": 0,
                                                                        "maximum": 9}},
                                 "required": ["x", "y"]}}},
}
REGEXES = [r"\d{3}-\d{4}", r"[a-z]{1,8}@[a-z]{1,6}\.(com|org)", r"(yes|no|maybe)!{0,3}", r"#[0-9a-f]{6}"]
CHOICES = [["alpha", "beta", "gamma delta"], ["是", "否", "也许"], ['{"a": 1}', 'x"y\\z', "(z)*"]]
TOOLS = [
    {"name": "get_weather", "description": "Weather for a city", "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 6},
                       "days": {"type": "integer", "minimum": 1, "maximum": 7},
                       "unit": {"enum": ["celsius", "fahrenheit"]},
                       "alerts": {"type": "boolean"},
                       "margin": {"type": "number", "minimum": -1, "maximum": 1}},
        "required": ["city", "days"]}},
    {"name": "search", "description": "Web search", "parameters": {
        "type": "object",
        "properties": {"query": {"type": "string", "maxLength": 6},
                       "limit": {"type": ["integer", "null"], "minimum": 1, "maximum": 20},
                       "sites": {"type": "array", "items": {"enum": ["a.com", "b.org"]}, "maxItems": 2}},
        "required": ["query"]}},
]
TOOL_SCHEMAS = {t["name"]: t["parameters"] for t in TOOLS}
MAX_TOKENS = 256   # above the longest text any of these (finite) grammars allows, even in byte pieces


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return make_engine(str(tiny_checkpoint), num_kv_blocks=1024, max_num_seqs=64, max_num_batched_tokens=1024)


def run(engine, requests) -> dict[str, RequestOutput]:
    """Add (request_id, prompt, params, chat) requests (a chat's params as the chat layer makes them), step until
    idle; accumulated outputs by id."""
    template = ChatTemplate(engine.tokenizer)
    results = {}
    for request_id, prompt, params, chat in requests:
        engine.add_request(request_id, prompt, template.sampling_params(params) if chat else params)
        results[request_id] = RequestOutput.empty(request_id, prompt, params.n)
    for delta in engine.step_until_idle():
        results[delta.request_id].merge(delta)
    assert_no_leaks(engine)
    return results


def chat_prompt(engine, text: str, tools=None) -> list[int]:
    messages = [ChatMessage("system", "You are helpful.", tools=tools)] if tools else []
    return build_chat_prompt(engine.tokenizer, messages + [ChatMessage("user", text)])


def sampled(seed: int, structured: StructuredOutput, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=MAX_TOKENS, structured=structured, **kwargs)


def test_hundreds_of_sampled_outputs_all_parse_and_validate(engine):
    tok = engine.tokenizer
    observation = tok.special_token_ids["<|observation|>"]
    prompts = random_prompts(64, tok.vocab_size - 9, (3, 40), seed=7)
    requests, checks = [], {}
    seed = 0

    def add(check, prompt, structured, chat=False):
        nonlocal seed
        seed += 1
        request_id = f"s{seed}"
        requests.append((request_id, prompt, sampled(seed, structured), chat))
        checks[request_id] = check

    def json_check(schema):
        def check(out):
            assert out.finish_reason == "stop" and out.stop_reason in (2, *tok.chat_stop_token_ids)
            jsonschema.validate(json.loads(out.text), schema)
        return check

    for name, schema in SCHEMAS.items():
        for i in range(16):
            add(json_check(schema), prompts[(i * 7 + len(name)) % 64], StructuredOutput(json_schema=schema))
        for i in range(2):   # the same schemas in a chat (the reply's content is the JSON)
            add(json_check(schema), chat_prompt(engine, f"give me {name} {i}"),
                StructuredOutput(json_schema=json.dumps(schema)), chat=True)
    for pattern in REGEXES:
        for i in range(10):
            add(lambda out, p=pattern: (out.finish_reason == "stop" and re.fullmatch(p, out.text)) or
                pytest.fail(f"{out.text!r} ({out.finish_reason}) does not match {p}"),
                prompts[(i * 5 + 3) % 64], StructuredOutput(regex=pattern))
    for choices in CHOICES:
        for i in range(8):
            add(lambda out, c=choices: (out.finish_reason == "stop" and out.text in c) or
                pytest.fail(f"{out.text!r} is not one of {c}"), prompts[(i * 3 + 1) % 64],
                StructuredOutput(choice=choices))

    def tool_check(names):
        def check(out):
            assert out.finish_reason == "stop" and out.stop_reason == observation
            call = parse_tool_call(out.text)
            assert call.name in names
            jsonschema.validate(call.arguments, TOOL_SCHEMAS[call.name])
        return check

    required = tool_call_output(TOOLS, ToolChoice("required"))
    named = tool_call_output(TOOLS, ToolChoice.named("search"))
    for i in range(16):
        add(tool_check({"get_weather", "search"}), chat_prompt(engine, f"question {i}", TOOLS), required, chat=True)
        add(tool_check({"search"}), chat_prompt(engine, f"look up {i}", TOOLS), named, chat=True)

    assert len(requests) >= 200
    results = run(engine, requests)
    texts = []
    for request_id, check in checks.items():
        out = results[request_id].outputs[0]
        try:
            check(out)
        except Exception as exc:   # name the request and its text
            pytest.fail(f"{request_id}: {out.text!r} ({out.finish_reason}): {exc}")
        texts.append(out.text)
    assert len(set(texts)) > 150, "sampled outputs should differ (temperature 1.0)"
    # Both tools were chosen under "required": the choice is the model's, not a default.
    calls = [parse_tool_call(results[r].outputs[0].text).name for r, (_, _, p, _) in
             zip(checks, requests) if p.structured is required]
    assert set(calls) == {"get_weather", "search"}
    assert engine.structured.stats.compiles <= len(SCHEMAS) * 2 + len(REGEXES) + len(CHOICES) + 2   # cached


def test_free_replies_of_the_same_model_are_gibberish(engine):
    """The control: without the constraint, the same sampling gives nothing that parses."""
    prompts = random_prompts(16, engine.tokenizer.vocab_size - 9, (3, 40), seed=7)
    results = run(engine, [(f"f{i}", p, SamplingParams(temperature=1.0, seed=i, max_tokens=24), False)
                           for i, p in enumerate(prompts)])
    for out in results.values():
        text = out.outputs[0].text
        with pytest.raises(ValueError):
            json.loads(text)
        assert not re.fullmatch(REGEXES[0], text)


def test_constrained_requests_leave_batched_greedy_outputs_unchanged(engine):
    prompts = random_prompts(12, engine.tokenizer.vocab_size - 9, (5, 60), seed=11)
    greedy = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    alone = {}
    for i, prompt in enumerate(prompts[:6]):
        alone.update(run(engine, [(f"g{i}", prompt, greedy, False)]))
    engine.block_manager.reset_prefix_cache()
    mixed = [(f"g{i}", p, greedy, False) for i, p in enumerate(prompts[:6])]
    mixed += [(f"c{i}", p, sampled(i, StructuredOutput(json_schema=SCHEMAS["enums"])), False)
              for i, p in enumerate(prompts[6:])]
    mixed += [("cg", prompts[0], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True,
                                                structured=StructuredOutput(regex=r"[a-z ]{30}")), False)]
    batched = run(engine, mixed)
    for i in range(6):
        assert batched[f"g{i}"].outputs[0].token_ids == alone[f"g{i}"].outputs[0].token_ids, f"g{i} changed"
    for i in range(6):
        jsonschema.validate(json.loads(batched[f"c{i}"].outputs[0].text), SCHEMAS["enums"])
    assert re.fullmatch(r"[a-z ]{30}", batched["cg"].outputs[0].text)   # greedy and constrained together


def test_preempted_constrained_requests_follow_their_grammar_and_sample_the_same(tiny_checkpoint):
    """A pool too small for the batch preempts requests mid-output; each recomputes and goes on from where its
    matcher is. Seeded, each sample is the same as with a pool large enough for all."""
    prompts = random_prompts(10, 1990, (20, 60), seed=3)
    params = [sampled(100 + i, StructuredOutput(json_schema=SCHEMAS["optional"] if i % 2 else SCHEMAS["nested"]))
              for i in range(10)]
    requests = [(f"p{i}", p, q, False) for i, (p, q) in enumerate(zip(prompts, params))]
    roomy = run(make_engine(str(tiny_checkpoint), num_kv_blocks=1024), requests)
    small = make_engine(str(tiny_checkpoint), num_kv_blocks=30, max_num_batched_tokens=2048)
    tight = run(small, requests)
    assert small.stats().num_preemptions > 0
    for i in range(10):
        out = tight[f"p{i}"].outputs[0]
        jsonschema.validate(json.loads(out.text), params[i].structured.json_schema)
        assert out.token_ids == roomy[f"p{i}"].outputs[0].token_ids, f"p{i} differs after preemption"


def test_each_of_n_samples_follows_the_grammar_with_its_own_matcher(engine):
    prompt = random_prompts(1, 1990, (10, 10), seed=4)[0]
    pattern = r"[a-z]{2,6}-\d{2}"
    out = run(engine, [("n", prompt, SamplingParams(n=8, temperature=1.0, max_tokens=64,
                                                     structured=StructuredOutput(regex=pattern)), False)])["n"]
    texts = [o.text for o in out.outputs]
    assert all(re.fullmatch(pattern, t) for t in texts), texts
    assert len(set(texts)) > 4   # one shared matcher would have been fed all eight samples' tokens


def test_a_grammar_that_cannot_finish_ends_on_length(engine):
    prompt = random_prompts(1, 1990, (10, 10), seed=5)[0]
    results = run(engine, [("long", prompt, SamplingParams(temperature=1.0, max_tokens=5,
                                                            structured=StructuredOutput(regex=r"[a-z]{50}")), False),
                           ("json", prompt, SamplingParams(temperature=1.0, max_tokens=3,
                                                           structured=StructuredOutput(json_schema=SCHEMAS["nested"])),
                            False)])
    for out in results.values():
        assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) <= 5
    assert re.fullmatch(r"[a-z]{1,50}", results["long"].outputs[0].text)


def test_a_complete_grammar_ends_the_request_despite_min_tokens_and_ignore_eos(engine):
    prompt = random_prompts(1, 1990, (10, 10), seed=6)[0]
    params = SamplingParams(temperature=1.0, seed=1, max_tokens=64, min_tokens=60, ignore_eos=True,
                            structured=StructuredOutput(choice=["yes", "no"]))
    out = run(engine, [("c", prompt, params, False)])["c"].outputs[0]
    assert out.text in ("yes", "no") and out.finish_reason == "stop" and out.token_ids[-1] == 2


def test_json_object_mode_writes_json_objects(engine):
    prompts = random_prompts(12, 1990, (5, 20), seed=8)
    results = run(engine, [(f"o{i}", p, SamplingParams(temperature=1.0, seed=i, max_tokens=32,
                                                        structured=StructuredOutput(json_object=True)), False)
                           for i, p in enumerate(prompts)])
    finished = [o.outputs[0] for o in results.values() if o.outputs[0].finish_reason == "stop"]
    assert finished   # free-form JSON strings rarely close on random weights; the short ones must parse
    for out in finished:
        assert isinstance(json.loads(out.text), dict)
    for out in results.values():
        assert out.outputs[0].text.startswith("{")


def test_a_slow_compile_holds_up_only_its_own_request(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint))
    release = threading.Event()
    compile_now = engine.structured._compile_now

    def slow(*args):
        assert release.wait(60)
        return compile_now(*args)
    engine.structured._compile_now = slow
    prompts = random_prompts(4, 1990, (5, 20), seed=9)
    engine.add_request("constrained", prompts[0], sampled(1, StructuredOutput(regex=r"\d{4}")))
    for i in range(1, 4):
        engine.add_request(f"free{i}", prompts[i], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    finished = set()
    for _ in range(100):
        finished |= {o.request_id for o in engine.step() if o.finished}
        if finished >= {"free1", "free2", "free3"}:
            break
    assert finished == {"free1", "free2", "free3"}      # stepped on while the grammar compiled
    assert engine.scheduler.num_waiting == 1
    assert engine.scheduler.requests[("constrained", 0)].num_computed_tokens == 0
    release.set()
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.outputs[0].text
    assert re.fullmatch(r"\d{4}", text)
    assert_no_leaks(engine)


def test_a_failed_compile_aborts_its_request_and_nothing_else(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint))

    def broken(*args):
        raise RuntimeError("compiler exploded")
    engine.structured._compile_now = broken
    prompts = random_prompts(2, 1990, (5, 20), seed=10)
    results = run(engine, [("bad", prompts[0], sampled(1, StructuredOutput(regex="x+")), False),
                           ("ok", prompts[1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), False)])
    assert results["bad"].outputs[0].finish_reason == "abort"
    assert results["ok"].outputs[0].finish_reason == "length"


def test_requests_with_the_same_schema_share_one_compile(tiny_checkpoint):
    engine = make_engine(str(tiny_checkpoint))
    prompts = random_prompts(6, 1990, (5, 20), seed=12)
    spec = StructuredOutput(json_schema=json.dumps(SCHEMAS["enums"]))
    run(engine, [(f"r{i}", p, sampled(i, spec), False) for i, p in enumerate(prompts)])
    assert engine.structured.stats.compiles == 1 and engine.structured.stats.hits == 5
    run(engine, [("chat", chat_prompt(engine, "hi"), sampled(0, spec), True)])   # a chat reply's grammar differs
    assert engine.structured.stats.compiles == 2


def test_bad_structured_requests_are_refused_before_queuing(engine):
    from glmserve.engine.core.sampling_params import SamplingParamsError
    for spec, field in [(StructuredOutput(json_schema='{"type": "objekt"}'), "structured.json_schema"),
                        (StructuredOutput(regex="(a"), "structured.regex"),
                        (StructuredOutput(grammar="root ::= ("), "structured.grammar")]:
        with pytest.raises(SamplingParamsError) as info:
            engine.add_request("bad", [5, 6, 7], SamplingParams(structured=spec))
        assert info.value.field == field
    assert not engine.has_unfinished_requests()


def test_the_compiled_cache_keeps_within_its_byte_budget(tiny_checkpoint):
    from glmserve.engine.structured.compiler import StructuredOutputs
    engine = make_engine(str(tiny_checkpoint))
    cache = StructuredOutputs(engine.tokenizer, engine.model_config.padded_vocab_size, max_cached_bytes=1)
    first = cache.compile(StructuredOutput(regex="a+"), chat=False)
    first.result()
    cache.compile(StructuredOutput(regex="b+"), chat=False).result()
    cache.compile(StructuredOutput(regex="c+"), chat=False).result()
    assert cache.compile(StructuredOutput(regex="c+"), chat=False).done()   # the newest stays
    again = cache.compile(StructuredOutput(regex="a+"), chat=False)
    assert again is not first   # evicted: compiled anew
    again.result()
    assert cache.stats.compiles == 4
    cache.shutdown()
