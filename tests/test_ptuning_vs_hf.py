"""P-tuning v2 prefixes against HF GlmForCausalLM with a DynamicCache pre-filled with the prefix K/V (independent
reference, GLM3_FACTS.md), fp32.

Three fine-tunes written to disk in ChatGLM3's P-tuning v2 format: prefix_projection false and true, and prefix
lengths that fill part of a block (5), whole blocks (16) and whole blocks plus part of one (23), run in one engine
batch with base requests. Every request's logits after every position within 1e-4 of the reference, and 32 greedy
tokens identical (tie-aware).
"""
from __future__ import annotations

import pytest
import torch

from glmserve.engine.config.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.config.model_config import MODEL_PRESETS
from glmserve.engine.config.lora_config import LoraConfig
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.lora.adapter_writer import write_ptuning_checkpoint
from glmserve.engine.runtime.engine_core import EngineCore

from .adapter_reference import (EngineTrace, assert_greedy_matches, prefix_logits_fn, reference_greedy,
                                reference_prefix_kv)
from .engine_helpers import assert_no_leaks, random_prompts

CONFIG = MODEL_PRESETS["glm-tiny"]
FINETUNES = {"pt-5": (5, False), "pt-23-proj": (23, True), "pt-16-proj": (16, True), "pt-16": (16, False)}
REQUEST_ADAPTERS = ["pt-5", None, "pt-23-proj", "pt-16-proj", "pt-5", "pt-16"]
STEPS = 32


@pytest.fixture(scope="module")
def finetune_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ptuning")
    return {name: write_ptuning_checkpoint(root / name, CONFIG, pre_seq_len=p, prefix_projection=proj, seed=i + 1)
            for i, (name, (p, proj)) in enumerate(FINETUNES.items())}


@pytest.fixture(scope="module")
def engine_run(tiny_checkpoint, finetune_dirs):
    config = EngineConfig(
        model=str(tiny_checkpoint), cache=CacheConfig(num_kv_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=1024),
        lora=LoraConfig(ptuning_prefixes=[(name, str(path)) for name, path in finetune_dirs.items()]))
    engine = EngineCore(config)
    pinned = sum(len(p.block_ids) for p in engine.block_manager.pinned)
    assert pinned == 1 + 2 + 1 + 1, "each prefix pins ceil(P / 16) blocks"
    trace = EngineTrace(engine)
    prompts = random_prompts(len(REQUEST_ADAPTERS), engine.tokenizer.vocab_size, (3, 40), seed=21)
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(zip(prompts, REQUEST_ADAPTERS)):
        engine.add_request(f"r{i}", prompt, params, adapter=adapter)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    for name in FINETUNES:
        engine.unload_adapter(name)
    assert_no_leaks(engine)
    return engine, trace, prompts, tokens


@pytest.fixture(scope="module")
def hf_model(tiny_checkpoint):
    from safetensors.torch import load_file

    from .hf_reference import build_hf_model
    return build_hf_model(CONFIG, load_file(str(tiny_checkpoint / "model.safetensors")))


def _reference(hf_model, finetune_dirs, adapter):
    if adapter is None:
        return torch.no_grad()(lambda tokens: hf_model(torch.tensor([tokens])).logits[0].float())
    return prefix_logits_fn(hf_model, reference_prefix_kv(finetune_dirs[adapter], CONFIG))


@pytest.mark.parametrize("index", range(len(REQUEST_ADAPTERS)))
def test_prefix_logits_match_hf_with_prefilled_cache(engine_run, hf_model, finetune_dirs, index):
    _, trace, prompts, tokens = engine_run
    request_id, adapter = f"r{index}", REQUEST_ADAPTERS[index]
    sequence = prompts[index] + tokens[request_id][:-1]
    ours = trace.logits(request_id)
    reference = _reference(hf_model, finetune_dirs, adapter)(sequence)
    assert ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    assert diff <= 1e-4, f"{request_id} ({adapter or 'base'}): max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("index", range(len(REQUEST_ADAPTERS)))
def test_prefix_greedy_tokens_match_hf(engine_run, hf_model, finetune_dirs, index):
    engine, _, prompts, tokens = engine_run
    adapter = REQUEST_ADAPTERS[index]
    expected, step_logits = reference_greedy(_reference(hf_model, finetune_dirs, adapter), prompts[index], STEPS,
                                             engine.tokenizer.vocab_size)
    assert_greedy_matches(tokens[f"r{index}"], expected, step_logits, f"r{index} ({adapter or 'base'})")


def test_prefixes_change_the_output(engine_run, hf_model, finetune_dirs):
    _, _, prompts, _ = engine_run
    base = _reference(hf_model, finetune_dirs, None)(prompts[0])
    for name in FINETUNES:
        assert (_reference(hf_model, finetune_dirs, name)(prompts[0]) - base).abs().max().item() > 1e-2, name
