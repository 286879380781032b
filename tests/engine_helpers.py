"""Helpers for engine tests: build an EngineCore on a checkpoint, drive it, check that no KV block leaked."""
from __future__ import annotations

import random

from glmserve.engine.config.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.config.lora_config import LoraConfig
from glmserve.engine.runtime.engine_core import EngineCore
from glmserve.engine.core.outputs import RequestOutput


def make_engine(model: str, *, num_kv_blocks: int | None = 512, block_size: int = 16, max_num_seqs: int = 64,
                max_num_batched_tokens: int = 512, prefix_caching: bool = True, chunked_prefill: bool = True,
                attention_backend: str = "auto", max_model_len: int | None = None, device: str = "cpu",
                dtype: str = "auto", lora: LoraConfig | None = None) -> EngineCore:
    return EngineCore(EngineConfig(
        model=model, attention_backend=attention_backend, device=device, dtype=dtype, lora=lora or LoraConfig(),
        cache=CacheConfig(block_size=block_size, num_kv_blocks=num_kv_blocks, enable_prefix_caching=prefix_caching),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                  enable_chunked_prefill=chunked_prefill, max_model_len=max_model_len)))


def run_to_completion(engine: EngineCore, arrivals: dict[int, list[tuple]] | None = None) -> dict[str, list[int]]:
    """Step until idle; ``arrivals[step]`` lists (request_id, prompt, params) added before that step.
    Returns the output token ids per request id."""
    arrivals = dict(arrivals or {})
    tokens: dict[str, list[int]] = {}
    step = 0
    while arrivals or engine.has_unfinished_requests():
        for request_id, prompt, params in arrivals.pop(step, []):
            engine.add_request(request_id, prompt, params)
            tokens[request_id] = []
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        step += 1
    return tokens


def collect(outputs: list[RequestOutput]) -> dict[str, list[int]]:
    result: dict[str, list[int]] = {}
    for out in outputs:
        result.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    return result


def assert_no_leaks(engine: EngineCore) -> None:
    bm = engine.block_manager
    bm.check_invariants()
    assert not bm.req_blocks, f"requests still own blocks: {list(bm.req_blocks)}"
    pinned = sum(len(prefix.block_ids) for prefix in bm.pinned)     # loaded P-tuning prefixes: not leaks
    assert bm.num_free_blocks == bm.num_blocks - pinned, \
        f"{bm.num_blocks - pinned - bm.num_free_blocks} KV blocks leaked"


def random_prompts(count: int, vocab: int, lengths: tuple[int, int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(*lengths))] for _ in range(count)]
