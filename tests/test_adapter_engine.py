"""Fine-tunes in the engine: a batch mixing two P-tuning fine-tunes, LoRA adapters and base requests gives every
request its solo result (with chunked prefill and prefix caching on); LRU residency under --max-loras; prefix-cache
isolation between fine-tunes; bad adapters, unknown names and unloads in use. fp32 greedy on glm-tiny."""
from __future__ import annotations

import json
import random

import pytest
import torch

from glmserve.engine.config.errors import ConfigError
from glmserve.engine.config.model_config import MODEL_PRESETS
from glmserve.engine.config.lora_config import LoraConfig
from glmserve.engine.core.adapters import (AdapterExistsError, AdapterInUseError, AdapterKind, AdapterLoadError,
                                           UnknownAdapterError)
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.lora.adapter_writer import write_lora_adapter, write_ptuning_checkpoint

from .engine_helpers import assert_no_leaks, make_engine, random_prompts

CONFIG = MODEL_PRESETS["glm-tiny"]
GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def finetunes(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetunes")
    return {
        "pt-a": write_ptuning_checkpoint(root / "pt-a", CONFIG, pre_seq_len=21, prefix_projection=False, seed=1),
        "pt-b": write_ptuning_checkpoint(root / "pt-b", CONFIG, pre_seq_len=8, prefix_projection=True, seed=2),
        "lora-a": write_lora_adapter(root / "lora-a", CONFIG, rank=4, alpha=8, seed=3,
                                     targets=("query_key_value", "dense_4h_to_h")),
        "lora-b": write_lora_adapter(root / "lora-b", CONFIG, rank=8, alpha=8, seed=4, fmt="bin",
                                     targets=("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")),
        "lora-c": write_lora_adapter(root / "lora-c", CONFIG, rank=2, alpha=2, seed=5, targets=("dense",)),
    }


def _engine(checkpoint, finetunes, names, **kwargs):
    engine = make_engine(str(checkpoint), **kwargs)
    for name in names:
        engine.load_adapter(name, str(finetunes[name]))
    return engine


def _run(engine, requests, arrivals_per_step: int = 100) -> tuple[dict[str, list[int]], dict[str, int]]:
    """requests: (id, prompt, params, adapter); a few arrive each step. Returns tokens and cached tokens per id."""
    pending = list(requests)
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    while pending or engine.has_unfinished_requests():
        for request_id, prompt, params, adapter in pending[:arrivals_per_step]:
            engine.add_request(request_id, prompt, params, adapter=adapter)
        del pending[:arrivals_per_step]
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
            cached[out.request_id] = out.num_cached_tokens
    return tokens, cached


@pytest.fixture(scope="module")
def workload():
    """24 requests over base, two P-tuning fine-tunes and two LoRAs; some share prompts (across fine-tunes too)."""
    rng = random.Random(7)
    adapters = [None, "pt-a", "pt-b", "lora-a", "lora-b"]
    requests = []
    for i, prompt in enumerate(random_prompts(14, 2000, (1, 90), seed=5)):
        params = SamplingParams(max_tokens=rng.randint(1, 24), **GREEDY)
        requests.append((f"r{i}", prompt, params, adapters[i % len(adapters)]))
    shared = random_prompts(1, 2000, (50, 50), seed=3)[0]
    for adapter in adapters:      # the same prompt twice under each: the second may reuse the first's blocks
        for k in range(2):
            params = SamplingParams(max_tokens=rng.randint(1, 24), **GREEDY)
            requests.append((f"shared-{adapter}-{k}", shared, params, adapter))
    return requests


@pytest.fixture(scope="module")
def solo(tiny_checkpoint, finetunes, workload):
    engine = _engine(tiny_checkpoint, finetunes, ["pt-a", "pt-b", "lora-a", "lora-b"], prefix_caching=False)
    results = {}
    for request in workload:
        results[request[0]] = _run(engine, [request])[0][request[0]]
    assert_no_leaks(engine)
    return results


def test_mixed_batch_equals_solo_with_chunking_and_prefix_caching(tiny_checkpoint, finetunes, workload, solo):
    engine = _engine(tiny_checkpoint, finetunes, ["pt-a", "pt-b", "lora-a", "lora-b"],
                     max_num_batched_tokens=96)     # long prompts are chunked across steps
    shuffled = list(workload)
    random.Random(1).shuffle(shuffled)
    tokens, cached = _run(engine, shuffled, arrivals_per_step=3)
    for request_id, expected in solo.items():
        assert tokens[request_id] == expected, f"{request_id} differs in the mixed batch"
    # The repeated prompts hit the prefix cache, each only behind its own fine-tune.
    assert sum(cached.values()) > 0
    assert engine.stats().prefix_cache_hits > 0
    assert_no_leaks(engine)        # every block but the prefixes' pinned ones is free
    for name in ("pt-a", "pt-b", "lora-a", "lora-b"):
        engine.unload_adapter(name)
    assert_no_leaks(engine)


def test_same_prompt_under_different_finetunes_shares_no_kv(tiny_checkpoint, finetunes):
    engine = _engine(tiny_checkpoint, finetunes, ["pt-a", "pt-b", "lora-a", "lora-b"])
    prompt = random_prompts(1, 2000, (70, 70), seed=9)[0]
    params = SamplingParams(max_tokens=2, **GREEDY)
    order = [None, "lora-a", "lora-b", "pt-a", "pt-b"]
    _, first = _run(engine, [(f"first-{a}", prompt, params, a) for a in order], arrivals_per_step=1)
    assert all(v == 0 for v in first.values()), first
    _, again = _run(engine, [(f"again-{a}", prompt, params, a) for a in order], arrivals_per_step=1)
    assert all(v > 0 for v in again.values()), again


def test_max_loras_limits_running_adapters_and_evicts_least_recently_used(tiny_checkpoint, finetunes):
    names = ["lora-a", "lora-b", "lora-c"]
    engine = make_engine(str(tiny_checkpoint), lora=LoraConfig(max_loras=2, max_lora_rank=8))
    for name in names:
        engine.load_adapter(name, str(finetunes[name]))
    prompts = random_prompts(6, 2000, (5, 30), seed=13)
    requests = [(f"q{i}", p, SamplingParams(max_tokens=6, **GREEDY), names[i % 3]) for i, p in enumerate(prompts)]
    expected = {r[0]: _run(engine, [r])[0][r[0]] for r in requests}
    for request in requests:
        engine.add_request(request[0], request[1], request[2], adapter=request[3])
    loads_before = engine.runner.lora_slots.loads
    tokens: dict[str, list[int]] = {}
    saw_waiting = False
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
        stats = engine.lora_stats()
        assert len(stats["running"]) <= 2 and stats["max_lora"] == 2
        saw_waiting |= bool(set(stats["waiting"]) - set(stats["running"]))
    assert saw_waiting, "the third adapter's requests should have waited for a slot"
    assert tokens == expected
    assert engine.runner.lora_slots.loads > loads_before       # slots were refilled as adapters took turns
    assert len(engine.runner.lora_slots.resident) == 2
    assert_no_leaks(engine)


# ---- errors -------------------------------------------------------------------------------------------------------
def test_unknown_adapter_is_refused_and_nothing_is_queued(tiny_checkpoint, finetunes):
    engine = _engine(tiny_checkpoint, finetunes, ["lora-a"])
    with pytest.raises(UnknownAdapterError, match="'nope' is not loaded.*lora-a"):
        engine.add_request("x", [5, 6, 7], SamplingParams(max_tokens=2), adapter="nope")
    assert not engine.has_unfinished_requests()
    with pytest.raises(UnknownAdapterError):
        engine.unload_adapter("nope")


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _rewrite_lora(folder, edit):
    from safetensors.torch import load_file, save_file
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


QKV_A = "base_model.model.transformer.encoder.layers.1.self_attention.query_key_value.lora_A.weight"
QKV_B = "base_model.model.transformer.encoder.layers.1.self_attention.query_key_value.lora_B.weight"


EMBEDDING_A = "base_model.model.transformer.embedding.word_embeddings.lora_A.weight"


@pytest.mark.parametrize("case, edit, message", [
    ("shape", lambda t: t.__setitem__(QKV_A, torch.zeros(4, 7)),
     r"adapter_model\.safetensors: tensor '.*layers\.1\.self_attention\.query_key_value\.lora_A\.weight' has "
     r"shape \[4, 7\], expected \[4, 128\]"),
    ("missing-b", lambda t: t.pop(QKV_B),
     r"adapter_model\.safetensors: layer 1 query_key_value has lora_A but no lora_B"),
    ("unknown-tensor", lambda t: t.__setitem__(EMBEDDING_A, torch.zeros(4, 4)),
     r"adapter_model\.safetensors: tensor '.*word_embeddings\.lora_A\.weight' is not a LoRA weight"),
    ("layer", lambda t: t.__setitem__(QKV_A.replace("layers.1", "layers.9"), torch.zeros(4, 128)),
     r"tensor '.*layers\.9.*' is for layer 9, but the base model has 2 layers"),
    ("nan", lambda t: t[QKV_A].fill_(float("nan")), r"tensor '.*lora_A\.weight' is not finite"),
])
def test_malformed_lora_names_file_and_tensor_and_the_engine_keeps_serving(tiny_checkpoint, finetunes, tmp_path,
                                                                           case, edit, message):
    engine = _engine(tiny_checkpoint, finetunes, ["lora-a"])
    bad = _copy(finetunes["lora-a"], tmp_path / case)
    _rewrite_lora(bad, edit)
    with pytest.raises(AdapterLoadError, match=message):
        engine.load_adapter("bad", str(bad))
    assert [a.name for a in engine.adapters.list()] == ["lora-a"]
    tokens, _ = _run(engine, [("ok", [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY), "lora-a")])
    assert len(tokens["ok"]) == 3
    assert_no_leaks(engine)


@pytest.mark.parametrize("change, message", [
    ({"r": 0}, r"adapter_config\.json: r must be a positive integer, got 0"),
    ({"r": 32}, r"adapter_config\.json: r = 32 exceeds --max-lora-rank 16"),
    ({"target_modules": ["query_key_value", "word_embeddings"]},
     r"target_modules \['word_embeddings'\] are not supported"),
    ({"use_dora": True}, r"use_dora"),
    ({"peft_type": "PREFIX_TUNING"}, r"peft_type 'PREFIX_TUNING' is not supported"),
    ({"rank_pattern": {"dense": 2}}, r"rank_pattern"),
])
def test_bad_adapter_config_is_refused(tiny_checkpoint, finetunes, tmp_path, change, message):
    engine = make_engine(str(tiny_checkpoint))
    bad = _copy(finetunes["lora-a"], tmp_path / "bad")
    settings = json.loads((bad / "adapter_config.json").read_text())
    settings.update(change)
    (bad / "adapter_config.json").write_text(json.dumps(settings))
    with pytest.raises(AdapterLoadError, match=message):
        engine.load_adapter("bad", str(bad))
    assert engine.adapters.list() == []


def test_malformed_ptuning_checkpoints_are_refused(tiny_checkpoint, finetunes, tmp_path):
    engine = make_engine(str(tiny_checkpoint))
    bad = _copy(finetunes["pt-b"], tmp_path / "bad-shape")
    state = torch.load(bad / "pytorch_model.bin", weights_only=True)
    state["transformer.prefix_encoder.trans.2.bias"] = torch.zeros(3)
    torch.save(state, bad / "pytorch_model.bin")
    with pytest.raises(AdapterLoadError, match=r"pytorch_model\.bin: tensor 'transformer\.prefix_encoder\.trans\.2\."
                                               r"bias' has shape \[3\], expected \[256\]"):
        engine.load_adapter("bad", str(bad))
    missing = _copy(finetunes["pt-b"], tmp_path / "missing")
    state = torch.load(missing / "pytorch_model.bin", weights_only=True)
    del state["transformer.prefix_encoder.trans.0.weight"]
    torch.save(state, missing / "pytorch_model.bin")
    with pytest.raises(AdapterLoadError, match=r"tensor 'transformer\.prefix_encoder\.trans\.0\.weight' is missing"):
        engine.load_adapter("bad", str(missing))
    other_model = _copy(finetunes["pt-a"], tmp_path / "other-model")
    settings = json.loads((other_model / "config.json").read_text())
    settings["num_layers"] = 28
    (other_model / "config.json").write_text(json.dumps(settings))
    with pytest.raises(AdapterLoadError, match=r"config\.json: num_layers is 28, but the served model's is 2"):
        engine.load_adapter("bad", str(other_model))
    with pytest.raises(AdapterLoadError, match="neither a LoRA adapter"):
        engine.load_adapter("bad", str(tmp_path))
    with pytest.raises(AdapterLoadError, match="not a directory"):
        engine.load_adapter("bad", str(tmp_path / "nowhere"))
    assert engine.adapters.list() == [] and not engine.block_manager.pinned
    assert_no_leaks(engine)


def test_duplicate_and_bad_names(tiny_checkpoint, finetunes):
    engine = _engine(tiny_checkpoint, finetunes, ["lora-a"])
    with pytest.raises(AdapterExistsError, match="'lora-a' is already loaded"):
        engine.load_adapter("lora-a", str(finetunes["lora-b"]))
    with pytest.raises(AdapterLoadError, match="adapter name"):
        engine.load_adapter("has space", str(finetunes["lora-b"]))
    with pytest.raises(ConfigError, match="given twice"):
        LoraConfig(lora_adapters=[("x", "a")], ptuning_prefixes=[("x", "b")])


def test_unloading_an_adapter_in_use_is_refused_until_its_requests_finish(tiny_checkpoint, finetunes):
    engine = _engine(tiny_checkpoint, finetunes, ["lora-a", "pt-a"])
    for name in ("lora-a", "pt-a"):
        engine.add_request(f"busy-{name}", [5, 6, 7, 8], SamplingParams(max_tokens=4, **GREEDY), adapter=name)
    engine.step()
    for name in ("lora-a", "pt-a"):
        with pytest.raises(AdapterInUseError, match=f"'{name}' is used by 1 request"):
            engine.unload_adapter(name)
    while engine.has_unfinished_requests():
        engine.step()
    engine.unload_adapter("lora-a")
    engine.unload_adapter("pt-a")
    assert engine.adapters.list() == [] and not engine.block_manager.pinned
    with pytest.raises(UnknownAdapterError):
        engine.add_request("late", [5, 6], SamplingParams(max_tokens=1), adapter="pt-a")
    assert_no_leaks(engine)


def test_ptuning_prefix_that_does_not_fit_the_pool_is_refused(tiny_checkpoint, finetunes, tmp_path):
    from glmserve.engine.core.adapters import AdapterCapacityError
    engine = make_engine(str(tiny_checkpoint), num_kv_blocks=2)
    big = write_ptuning_checkpoint(tmp_path / "big", CONFIG, pre_seq_len=40)
    with pytest.raises(AdapterCapacityError, match="needs 3 KV blocks, 2 are free"):
        engine.load_adapter("big", str(big), AdapterKind.PTUNING)
    assert_no_leaks(engine)


def test_preemption_under_memory_pressure_keeps_solo_results(tiny_checkpoint, finetunes, workload, solo):
    needed = sum(-(-(30 + len(p) + q.max_tokens) // 16) for _, p, q, _ in workload)
    engine = _engine(tiny_checkpoint, finetunes, ["pt-a", "pt-b", "lora-a", "lora-b"], num_kv_blocks=needed // 4)
    tokens, _ = _run(engine, workload, arrivals_per_step=4)
    assert engine.stats().num_preemptions > 0
    for request_id, expected in solo.items():
        assert tokens[request_id] == expected, f"{request_id} differs after preemption"
    assert_no_leaks(engine)


def test_offline_llm_names_adapters_per_prompt(tiny_checkpoint, finetunes):
    from glmserve.engine.entrypoints.llm import LLM
    llm = LLM(str(tiny_checkpoint), num_kv_blocks=128)
    llm.load_adapter("lora-a", str(finetunes["lora-a"]))
    llm.load_adapter("pt-b", str(finetunes["pt-b"]))
    prompts = random_prompts(3, 2000, (5, 20), seed=17)
    params = SamplingParams(max_tokens=5, **GREEDY)
    mixed = llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter=[None, "lora-a", "pt-b"])
    for prompt, adapter, out in zip(prompts, [None, "lora-a", "pt-b"], mixed):
        alone = llm.generate(prompt_token_ids=[prompt], sampling_params=params, adapter=adapter)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
    with pytest.raises(UnknownAdapterError):
        llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter="nope")
    with pytest.raises(ValueError, match="got 2 adapters for 3 prompts"):
        llm.generate(prompt_token_ids=prompts, sampling_params=params, adapter=[None, None])
    llm.unload_adapter("pt-b")
    assert_no_leaks(llm.engine)


def test_tensor_parallel_engines_refuse_adapters(finetunes):
    from glmserve.engine.core.block_manager import BlockManager
    from glmserve.engine.lora.manager import AdapterManager
    manager = AdapterManager(None, BlockManager(4, 16), CONFIG, LoraConfig(), torch.float32, 1024,
                             tensor_parallel=True)
    with pytest.raises(AdapterLoadError, match="tensor_parallel_size > 1"):
        manager.load("lora-a", str(finetunes["lora-a"]))
