"""What structured outputs cost: decode throughput with every request constrained against none, in one process,
and the compile time of each schema, cold and cached.

    glmserve-bench structured [--model glm-small] [--batch 64] [--output-len 64] [--rounds 3] [--out FILE]

Throughput: ``--batch`` requests (random prompts of ``--prompt-len`` tokens) decode ``--output-len`` tokens each,
all in one batch, free ("none") and constrained ("constrained") in alternating rounds after one warm-up round of
each; the figure is output tokens over wall time, median of the rounds, and the loss is the median over the rounds
of 1 - constrained / none, each round's pair run back to back (a machine whose speed drifts shifts both alike).
On a busy machine the rounds vary more than the grammar costs, so the constrained rounds also time the grammar's
own work (filling the bitmask, unpacking it, advancing the matchers; the mask itself is applied in the float32
copy of the logits that the sampler makes anyway) and report its share of their wall time: the loss that noise
cannot hide.
The constrained rounds use a JSON schema that keeps every request writing for all its tokens (an array of at
least 10000 records of a bounded string, an integer range, an enum, a boolean and a nested object), so both kinds
of round run the same batch size for the same number of steps and the difference is the grammar's cost: filling
the token bitmask, applying it, advancing each matcher. ``--schema FILE`` constrains with another schema instead
(its requests may then end early, which changes the batch as well).

Compile: each schema of a small set (the throughput one, typical API schemas and a ChatGLM3 tool call) is parsed
and compiled against the model's vocabulary on a fresh cache ("cold", after the vocabulary itself is set up, which
is reported once), then asked for again ("cached").
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from glmserve.bench.common.output import write_json

LONG_RECORDS = {
    "type": "array", "minItems": 10000,
    "items": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "kind": {"enum": ["book", "film", "song", "game"]},
        "active": {"type": "boolean"},
        "where": {"type": "object", "properties": {"lat": {"type": "number", "minimum": -90, "maximum": 90},
                                                   "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                  "required": ["lat", "lon"]}},
        "required": ["id", "name", "kind", "active", "where"]},
}
COMPILE_SCHEMAS = {
    "records (throughput)": LONG_RECORDS,
    "person": {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                                "email": {"type": "string", "format": "email"}},
               "required": ["name", "age"]},
    "order": {"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "items": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
            "sku": {"type": "string", "maxLength": 16}, "qty": {"type": "integer", "minimum": 1, "maximum": 999},
            "price": {"type": "number", "minimum": 0}}, "required": ["sku", "qty", "price"]}},
        "status": {"enum": ["new", "paid", "shipped", "cancelled"]},
        "note": {"anyOf": [{"type": "string", "maxLength": 200}, {"type": "null"}]}},
        "required": ["id", "items", "status"]},
    "wide (40 fields)": {"type": "object", "properties": {
        f"field_{i}": [{"type": "string", "maxLength": 32}, {"type": "integer"}, {"type": "boolean"},
                       {"enum": ["a", "b", "c"]}][i % 4] for i in range(40)}, "required": ["field_0"]},
}
TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 32}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}},
    {"name": "search", "parameters": {"type": "object", "properties": {"query": {"type": "string"},
                                                                        "limit": {"type": "integer"}},
                                      "required": ["query"]}}]


@dataclass
class CompileTime:
    schema: str
    cold_ms: float
    cached_us: float


@dataclass
class StructuredResult:
    model: str
    device: str
    batch: int
    prompt_len: int
    output_len: int
    temperature: float
    rounds: int
    none_tokens_per_s: list[float] = field(default_factory=list)
    constrained_tokens_per_s: list[float] = field(default_factory=list)
    none_median: float = 0.0
    constrained_median: float = 0.0
    loss: float = 0.0                       # median over the rounds of 1 - constrained / none (same round)
    grammar_ms_per_step: dict[str, float] = field(default_factory=dict)   # fill / apply / advance
    grammar_share: float = 0.0              # of the constrained rounds' wall time
    vocabulary_setup_ms: float = 0.0
    compile: list[CompileTime] = field(default_factory=list)
    load_average: float = 0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="glm-small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each kind (after a warm-up of each)")
    parser.add_argument("--schema", default=None, help="constrain with this JSON Schema file instead")
    parser.add_argument("--out", default=None, help="write the result as JSON here")


def run(args: argparse.Namespace) -> int:
    for name in ("batch", "prompt_len", "output_len", "rounds"):
        if getattr(args, name) < 1:
            print(f"glmserve-bench structured: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    schema = LONG_RECORDS
    if args.schema:
        try:
            with open(args.schema, encoding="utf-8") as f:
                schema = json.load(f)
        except (OSError, ValueError) as exc:
            print(f"glmserve-bench structured: cannot read --schema {args.schema}: {exc}", file=sys.stderr)
            return 2
    result = measure(args, schema)
    print(report(result))
    if args.out:
        write_json(args.out, asdict(result))
    return 0


def measure(args: argparse.Namespace, schema: dict) -> StructuredResult:
    from glmserve.bench.common.machine import load_average
    from glmserve.engine.core.sampling_params import SamplingParams, StructuredOutput
    from glmserve.engine.entrypoints.llm import LLM

    blocks = args.batch * -(-(args.prompt_len + args.output_len) // 16) + 16
    llm = LLM(args.model, device=args.device, max_num_seqs=args.batch, num_kv_blocks=blocks,
              max_num_batched_tokens=max(2048, args.batch * args.prompt_len), enable_prefix_caching=False)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, llm.tokenizer.vocab_size - 9) for _ in range(args.prompt_len)]
               for _ in range(args.batch)]
    free = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, min_tokens=args.output_len,
                          ignore_eos=True)
    constrained = free.clone(structured=StructuredOutput(json_schema=json.dumps(schema)))
    result = StructuredResult(args.model, args.device, args.batch, args.prompt_len, args.output_len,
                              args.temperature, args.rounds)

    def tokens_per_s(params: SamplingParams) -> float:
        start = time.perf_counter()
        outs = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        seconds = time.perf_counter() - start
        return sum(len(o.outputs[0].token_ids) for o in outs) / seconds

    tokens_per_s(free), tokens_per_s(constrained)   # warm-up (and the schema's compile) before timing
    timers = GrammarTimers()
    constrained_seconds = steps = 0.0
    for _ in range(args.rounds):
        result.none_tokens_per_s.append(round(tokens_per_s(free), 1))
        with timers:
            rate = tokens_per_s(constrained)
        result.constrained_tokens_per_s.append(round(rate, 1))
        constrained_seconds += args.batch * args.output_len / rate
        steps += args.output_len
    result.grammar_ms_per_step = {k: round(v * 1e3 / steps, 3) for k, v in timers.seconds.items()}
    result.grammar_share = round(sum(timers.seconds.values()) / constrained_seconds, 4)
    result.none_median = statistics.median(result.none_tokens_per_s)
    result.constrained_median = statistics.median(result.constrained_tokens_per_s)
    result.loss = round(statistics.median(1 - c / n for n, c in zip(result.none_tokens_per_s,
                                                                     result.constrained_tokens_per_s)), 4)
    result.vocabulary_setup_ms, result.compile = compile_times(llm.engine)
    result.load_average = round(load_average(), 2)
    return result


class GrammarTimers:
    """Times the grammar's share of each step, by wrapping its three entry points while active."""

    def __init__(self):
        self.seconds = {"fill": 0.0, "mask": 0.0, "advance": 0.0}

    def __enter__(self):
        from glmserve.engine.runtime import engine_core
        from glmserve.engine.structured.bitmask import TokenBitmask
        from glmserve.engine.worker import model_runner
        # "mask" is unpacking the bitmask; applying it replaces the float32 copy the sampler makes anyway.
        self._patched = [(model_runner, "batch_bitmask", "fill"), (engine_core, "advance_grammars", "advance"),
                         (TokenBitmask, "_disallowed", "mask")]
        self._originals = [owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
                           for owner, name, _ in self._patched]
        for (owner, name, key), original in zip(self._patched, self._originals):
            if isinstance(original, staticmethod):
                setattr(owner, name, staticmethod(self._timed(original.__func__, key)))
            else:
                setattr(owner, name, self._timed(original, key))
        return self

    def __exit__(self, *exc):
        for (owner, name, _), original in zip(self._patched, self._originals):
            setattr(owner, name, original)

    def _timed(self, function, key):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[key] += time.perf_counter() - start
        return timed


def compile_times(engine) -> tuple[float, list[CompileTime]]:
    """Cold and cached compile of each schema on a fresh cache (the vocabulary set up first, timed apart)."""
    from glmserve.engine.core.sampling_params import StructuredOutput
    from glmserve.engine.structured.compiler import StructuredOutputs
    from glmserve.engine.structured.tool_call_grammar import ToolChoice, tool_call_output

    structured = StructuredOutputs(engine.tokenizer, engine.model_config.padded_vocab_size)
    start = time.perf_counter()
    structured._ensure_backend()
    setup_ms = (time.perf_counter() - start) * 1e3
    specs = [(name, StructuredOutput(json_schema=json.dumps(s)), False) for name, s in COMPILE_SCHEMAS.items()]
    specs.append(("ChatGLM3 tool call (2 tools)", tool_call_output(TOOLS, ToolChoice("required")), True))
    times = []
    for name, spec, chat in specs:
        start = time.perf_counter()
        structured.compile(spec, chat=chat).result()
        cold = time.perf_counter() - start
        start = time.perf_counter()
        structured.compile(spec, chat=chat).result()
        cached = time.perf_counter() - start
        times.append(CompileTime(name, round(cold * 1e3, 2), round(cached * 1e6, 1)))
    structured.shutdown()
    return round(setup_ms, 1), times


def report(r: StructuredResult) -> str:
    lines = [f"structured outputs on {r.model} ({r.device}): batch {r.batch}, prompts {r.prompt_len} tokens, "
             f"{r.output_len} output tokens each, temperature {r.temperature}, {r.rounds} rounds",
             f"  none         {r.none_median:9.1f} tok/s  (rounds: {', '.join(map(str, r.none_tokens_per_s))})",
             f"  constrained  {r.constrained_median:9.1f} tok/s  "
             f"(rounds: {', '.join(map(str, r.constrained_tokens_per_s))})",
             f"  loss         {r.loss * 100:8.1f} %  (median of the rounds' paired losses; their spread is this "
             "machine's noise)",
             f"  grammar work {r.grammar_share * 100:8.1f} % of the constrained rounds' time; per step: "
             + ", ".join(f"{k} {v:.2f} ms" for k, v in r.grammar_ms_per_step.items()),
             f"compile (vocabulary set up once: {r.vocabulary_setup_ms:.1f} ms)",
             f"  {'schema':<32} {'cold ms':>9} {'cached us':>10}"]
    lines += [f"  {c.schema:<32} {c.cold_ms:9.2f} {c.cached_us:10.1f}" for c in r.compile]
    lines.append(f"1-minute load average at the end: {r.load_average}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmserve-bench structured", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
