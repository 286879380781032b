"""LoRA adapters in one mixed batch against PEFT's PeftModel on HF GlmForCausalLM (independent reference), fp32.

Three adapters of different ranks (2, 8 with rsLoRA, 16), different target modules and both file formats, written to
disk in PEFT's format, run in one batch with base-model requests through the real engine. For every request: the
logits after every prompt and generated position within 1e-4 of PEFT with that adapter active (adapters disabled
for base requests), and 32 greedy tokens identical (tie-aware). Both CPU paths of the LoRA update run: all slots at
once (the default for steps of few rows) and per adapter (forced here for every step).
"""
from __future__ import annotations

import pytest
import torch

from glmserve.engine.config.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.config.model_config import MODEL_PRESETS
from glmserve.engine.config.lora_config import LoraConfig
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.lora import layers as lora_layers
from glmserve.engine.lora.adapter_writer import write_lora_adapter
from glmserve.engine.runtime.engine_core import EngineCore

from .adapter_reference import (EngineTrace, assert_greedy_matches, build_peft_model, peft_logits_fn,
                                reference_greedy)
from .engine_helpers import assert_no_leaks, random_prompts

pytest.importorskip("peft")

CONFIG = MODEL_PRESETS["glm-tiny"]
ALL_MODULES = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
ADAPTERS = {   # name -> (rank, alpha, targets, rslora, file format)
    "qkv-r2": (2, 4.0, ("query_key_value",), False, "safetensors"),
    "all-r8": (8, 16.0, ALL_MODULES, True, "bin"),
    "mlp-r16": (16, 8.0, ("dense", "dense_h_to_4h", "dense_4h_to_h"), False, "safetensors"),
}
# One request per adapter and base requests, interleaved, two of them sharing an adapter.
REQUEST_ADAPTERS = [None, "qkv-r2", "all-r8", None, "mlp-r16", "all-r8"]
STEPS = 32


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    return {name: write_lora_adapter(root / name, CONFIG, rank=r, alpha=alpha, targets=targets, use_rslora=rslora,
                                     seed=i + 1, fmt=fmt)
            for i, (name, (r, alpha, targets, rslora, fmt)) in enumerate(ADAPTERS.items())}


@pytest.fixture(scope="module", params=["all-slots", "per-adapter"])
def engine_run(request, tiny_checkpoint, adapter_dirs):
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "per-adapter":
            patch.setattr(lora_layers, "ALL_SLOTS_MAX_ROWS", 0)
        return _engine_run(tiny_checkpoint, adapter_dirs)


def _engine_run(tiny_checkpoint, adapter_dirs):
    """All requests in one engine batch; two adapters load at start-up, one at run time."""
    names = list(adapter_dirs)
    config = EngineConfig(
        model=str(tiny_checkpoint), cache=CacheConfig(num_kv_blocks=256),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=1024),
        lora=LoraConfig(max_loras=3, max_lora_rank=16,
                        lora_adapters=[(n, str(adapter_dirs[n])) for n in names[:2]]))
    engine = EngineCore(config)
    engine.load_adapter(names[2], str(adapter_dirs[names[2]]))
    trace = EngineTrace(engine)
    prompts = random_prompts(len(REQUEST_ADAPTERS), engine.tokenizer.vocab_size, (5, 40), seed=11)
    params = SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
    for i, (prompt, adapter) in enumerate(zip(prompts, REQUEST_ADAPTERS)):
        engine.add_request(f"r{i}", prompt, params, adapter=adapter)
    tokens: dict[str, list[int]] = {}
    first_step_size = None
    while engine.has_unfinished_requests():
        outputs = engine.step()
        if first_step_size is None:
            first_step_size = len(trace.rows)
        for out in outputs:
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    assert first_step_size == len(REQUEST_ADAPTERS), "all requests should share the first step"
    assert_no_leaks(engine)
    return engine, trace, prompts, tokens


@pytest.fixture(scope="module")
def peft_model(tiny_checkpoint, adapter_dirs):
    from safetensors.torch import load_file

    from .hf_reference import build_hf_model
    hf = build_hf_model(CONFIG, load_file(str(tiny_checkpoint / "model.safetensors")))
    return build_peft_model(hf, CONFIG, adapter_dirs)


@pytest.mark.parametrize("index", range(len(REQUEST_ADAPTERS)))
def test_mixed_batch_logits_match_peft(engine_run, peft_model, index):
    engine, trace, prompts, tokens = engine_run
    request_id, adapter = f"r{index}", REQUEST_ADAPTERS[index]
    sequence = prompts[index] + tokens[request_id][:-1]          # every position the engine computed
    ours = trace.logits(request_id)
    reference = peft_logits_fn(peft_model, adapter)(sequence)
    assert ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    assert diff <= 1e-4, f"{request_id} ({adapter or 'base'}): max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("index", range(len(REQUEST_ADAPTERS)))
def test_mixed_batch_greedy_tokens_match_peft(engine_run, peft_model, index):
    engine, _, prompts, tokens = engine_run
    adapter = REQUEST_ADAPTERS[index]
    expected, step_logits = reference_greedy(peft_logits_fn(peft_model, adapter), prompts[index], STEPS,
                                             engine.tokenizer.vocab_size)
    assert_greedy_matches(tokens[f"r{index}"], expected, step_logits, f"r{index} ({adapter or 'base'})")


def test_adapters_change_the_output(engine_run, peft_model):
    """The comparison means something: each adapter's reference logits differ clearly from the base model's."""
    _, _, prompts, _ = engine_run
    base = peft_logits_fn(peft_model, None)(prompts[1])
    for adapter in ADAPTERS:
        assert (peft_logits_fn(peft_model, adapter)(prompts[1]) - base).abs().max().item() > 1e-2, adapter
