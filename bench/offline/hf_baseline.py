"""HF transformers baselines: ``GlmForCausalLM.generate`` with static batches, and one request at a time.

Both decode greedily for exactly each request's output length (eos off, like glmserve's ``ignore_eos``) and never
choose the embedding-padding ids at and above the tokenizer's vocabulary (glmserve's sampler masks those too), so
their outputs can be compared with glmserve's token for token.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from glmserve.engine.config.model_config import ModelConfig

from glmserve.bench.common.hf_glm import hf_config, hf_state_dict
from glmserve.bench.offline.workload import BenchRequest

PAD_ID = 0


@dataclass
class HFRun:
    outputs: list[list[int]]    # per request run, in the order given
    seconds: float              # time inside generate(), summed over the calls

    @property
    def num_output_tokens(self) -> int:
        return sum(len(o) for o in self.outputs)


def build_hf_model(config: ModelConfig, state: dict[str, torch.Tensor], vocab_size: int,
                   dtype: torch.dtype = torch.float32):
    """GlmForCausalLM with the given ChatGLM3-named weights (copied), set up for the benchmark's greedy decoding."""
    from transformers import GlmForCausalLM
    model = GlmForCausalLM(hf_config(config))
    model.load_state_dict(hf_state_dict(config, state), strict=True)
    gen = model.generation_config
    # Set on the model's own generation config: generate() merges a passed GenerationConfig with these defaults,
    # so eos_token_id=None inside a fresh GenerationConfig would silently bring ChatGLM3's eos ids back.
    gen.eos_token_id = None
    gen.pad_token_id = PAD_ID
    gen.do_sample = False
    gen.suppress_tokens = list(range(vocab_size, config.padded_vocab_size)) or None
    return model.to(dtype).eval()


@torch.inference_mode()
def generate_static_batches(model, requests: Sequence[BenchRequest], batch_size: int) -> HFRun:
    """Batches of ``batch_size`` in arrival order (not sorted by length: static batching as a user writes it).

    Each batch is left-padded to its longest prompt and runs for its longest output; each request's output is then
    cut to its own length, so only useful tokens count.
    """
    outputs: list[list[int]] = []
    seconds = 0.0
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        input_ids, attention_mask = _left_pad([r.prompt_token_ids for r in batch])
        max_new = max(r.output_len for r in batch)
        t0 = time.perf_counter()
        out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=max_new)
        seconds += time.perf_counter() - t0
        new = out[:, input_ids.shape[1]:].tolist()
        outputs += [row[:r.output_len] for row, r in zip(new, batch)]
    return HFRun(outputs, seconds)


@torch.inference_mode()
def generate_one_at_a_time(model, requests: Sequence[BenchRequest]) -> HFRun:
    """Batch size 1, one ``generate`` per request: the way the model card's ``model.chat`` serves."""
    outputs: list[list[int]] = []
    seconds = 0.0
    for r in requests:
        input_ids = torch.tensor([r.prompt_token_ids])
        t0 = time.perf_counter()
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=r.output_len)
        seconds += time.perf_counter() - t0
        outputs.append(out[0, input_ids.shape[1]:].tolist())
    return HFRun(outputs, seconds)


def _left_pad(prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask
