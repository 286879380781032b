"""Turns a scheduled batch into flat tensors, runs the model over the paged KV cache and samples.

Batch layout (T tokens from B sequences): decode sequences (one token each) first, then prefill chunks.
Only the last token of a sequence that reaches its end this step is projected to logits and sampled.

Fine-tunes: a request under a P-tuning prefix of P slots has its token i in slot P + i of its block table (the
prefix's blocks first), while its rotary position stays i. A request under a LoRA adapter gets that adapter's slot in
the pass's ``LoraMapping`` (``LoraSlots`` makes the step's adapters resident).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from glmserve.engine.attention.backends import make_attention_backend
from glmserve.engine.attention.metadata import AttentionMetadata
from glmserve.engine.attention.triton_warmup import warmup_batch
from glmserve.engine.config.model_config import ModelConfig
from glmserve.engine.core.adapters import KVPrefix
from glmserve.engine.lora.slots import LoraSlots
from glmserve.engine.worker.cuda_graph import DecodeGraphs, GraphCapture
from glmserve.engine.model.forward_batch import ForwardBatch
from glmserve.engine.model.glm import GLMForCausalLM
from glmserve.engine.model.lora_mapping import LoraMapping
from glmserve.engine.core.request import Request
from glmserve.engine.worker.kv_cache import allocate_kv_caches
from glmserve.engine.worker.sampler import Sampler, SamplerOutput, SamplingRow
from glmserve.engine.core.scheduler import ScheduledBatch
from glmserve.engine.structured.bitmask import batch_bitmask


@dataclass
class ModelInputs:
    """One step's flat batch: everything a forward pass needs (what rank 0 sends to tensor-parallel workers)."""

    input_ids: torch.Tensor         # [T] int64
    positions: torch.Tensor         # [T] int64
    attention: AttentionMetadata
    logits_indices: torch.Tensor    # [S] int64: rows of the hidden states to project to logits (may be empty)
    lora: LoraMapping | None = None  # each token's LoRA slot; None when no token uses an adapter


@dataclass
class StepResult:
    """Per scheduled request (in the batch's order): the sampled token, or None for an unfinished prefill."""

    token_ids: list[int | None]
    logprobs: list[float | None]
    top_logprobs: list[list[tuple[int, float]] | None]


class ModelRunner:
    def __init__(self, model: GLMForCausalLM, *, num_blocks: int, block_size: int, max_model_len: int,
                 vocab_size: int, eos_token_id: int, attention_backend: str = "auto"):
        self.model = model
        self.config: ModelConfig = model.config
        self.device, self.dtype = model.weights_device, model.weights_dtype
        # "auto" is resolved here; the backend also decides the model's elementwise ops and linear packing.
        self.backend = make_attention_backend(attention_backend, self.device)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_caches = allocate_kv_caches(self.config, num_blocks, block_size, self.dtype, self.device)
        model.bind_runtime(self.backend, self.kv_caches, max_model_len)
        self.max_model_len = max_model_len
        self.sampler = Sampler(vocab_size, eos_token_id)
        self.decode_graphs: DecodeGraphs | None = None
        self.lora_slots: LoraSlots | None = None     # set up by enable_lora (when the first adapter loads)

    # ---- fine-tunes -------------------------------------------------------------------------------------------
    def enable_lora(self, max_loras: int, max_rank: int) -> LoraSlots:
        """Allocate ``max_loras`` slots of rank ``max_rank`` and wrap the model's linears (once)."""
        if self.lora_slots is None:
            self.lora_slots = LoraSlots(self.model, max_loras, max_rank)
        return self.lora_slots

    @torch.inference_mode()
    def write_prefix_kv(self, prefix: KVPrefix, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store a P-tuning prefix (keys, values [num_layers, P, groups, head_dim], as stored: no rotary) in its
        pinned blocks of every layer's cache."""
        bs = self.block_size
        slots = torch.tensor([prefix.block_ids[p // bs] * bs + p % bs for p in range(prefix.num_slots)],
                             dtype=torch.int64, device=self.device)
        for (k_cache, v_cache), k, v in zip(self.kv_caches, keys, values, strict=True):
            k_cache.view(-1, *k_cache.shape[2:])[slots] = k.to(device=self.device, dtype=k_cache.dtype)
            v_cache.view(-1, *v_cache.shape[2:])[slots] = v.to(device=self.device, dtype=v_cache.dtype)

    def _copy_prefix_tails(self, sources: list[int], targets: list[int]) -> None:
        """Copy K/V slots ``sources`` to ``targets`` in every layer (a P-tuning prefix's last, partial block into the
        first own block of a sequence starting this step)."""
        src = torch.tensor(sources, dtype=torch.int64, device=self.device)
        dst = torch.tensor(targets, dtype=torch.int64, device=self.device)
        for k_cache, v_cache in self.kv_caches:
            for cache in (k_cache, v_cache):
                flat = cache.view(-1, *cache.shape[2:])
                flat[dst] = flat[src]

    def enable_decode_graphs(self, capture: GraphCapture, max_batch: int) -> None:
        """Capture decode-only forwards for up to ``max_batch`` sequences (cuda_graph.py); later decode-only
        steps that fit replay them, every other step runs eagerly."""
        self.decode_graphs = DecodeGraphs(self.model, max_batch=max_batch, max_model_len=self.max_model_len,
                                          block_size=self.block_size, device=self.device, capture=capture)

    @torch.inference_mode()
    def warm_up(self) -> int:
        """Run the attention backend's warm-up batches through the model (a backend without ``warmup_steps`` has
        none), so every kernel variant is compiled before the first request. Returns how many batches ran."""
        steps_for = getattr(self.backend, "warmup_steps", None)
        if steps_for is None:
            return 0
        steps = steps_for(self.config.num_attention_heads, self.config.num_kv_heads, self.max_model_len)
        no_logits = torch.empty(0, dtype=torch.int64, device=self.device)
        for step in steps:
            batch = warmup_batch(step, self.block_size, self.device)
            self.run_model(ModelInputs(torch.zeros_like(batch.positions), batch.positions, batch.attention, no_logits))
        return len(steps)

    @staticmethod
    def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        return config.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size()) * block_size

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, block_tables: list[list[int]]) -> StepResult:
        """``block_tables[i]`` are the KV blocks of ``batch.requests[i]``."""
        lora_slots = self._lora_slots_of(batch.requests)
        order = self.batch_order(batch, lora_slots)
        requests = [batch.requests[i] for i in order]
        counts = [batch.num_new_tokens[i] for i in order]
        tables = [block_tables[i] for i in order]
        input_ids, positions, slots, query_start, seq_lens = [], [], [], [0], []
        token_lora_slots: list[int] = []
        tail_sources: list[int] = []
        tail_targets: list[int] = []
        bs = self.block_size
        for request, n, table in zip(requests, counts, tables):
            start = request.num_computed_tokens
            prefix = request.adapter.kv_prefix if request.adapter is not None else None
            offset = prefix.num_slots if prefix is not None else 0    # KV slots before the request's token 0
            input_ids.extend(request.token_ids[start:start + n])
            positions.extend(range(start, start + n))               # rotary positions start at 0 after a prefix
            slots.extend(table[p // bs] * bs + p % bs for p in range(offset + start, offset + start + n))
            query_start.append(query_start[-1] + n)
            seq_lens.append(offset + start + n)
            if lora_slots:
                token_lora_slots.extend([lora_slots.get(id(request), -1)] * n)
            if prefix is not None and prefix.tail and start == 0:
                # A fresh first own block (a cached one would give start > 0): it begins with the prefix's tail.
                first_own = table[len(prefix.shared_block_ids)]
                tail_sources.extend(prefix.tail_source_block * bs + i for i in range(prefix.tail))
                tail_targets.extend(first_own * bs + i for i in range(prefix.tail))
        if tail_targets:
            self._copy_prefix_tails(tail_sources, tail_targets)
        max_blocks = max(len(t) for t in tables)
        padded = [t + [0] * (max_blocks - len(t)) for t in tables]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=dev),
            num_decodes=sum(1 for n in counts if n == 1),
            max_query_len=max(counts), max_seq_len=max(seq_lens))
        # Sample only sequences whose last token is computed this step.
        sample_at = [i for i, (r, n) in enumerate(zip(requests, counts)) if r.num_computed_tokens + n == r.num_tokens]
        last_token = torch.tensor([query_start[i + 1] - 1 for i in sample_at], dtype=torch.int64, device=dev)
        lora = LoraMapping.from_token_slots(token_lora_slots, dev) if lora_slots else None
        logits = self.run_model(ModelInputs(torch.tensor(input_ids, dtype=torch.int64, device=dev),
                                            torch.tensor(positions, dtype=torch.int64, device=dev), meta, last_token,
                                            lora))
        result = StepResult([None] * len(batch), [None] * len(batch), [None] * len(batch))
        if not sample_at:
            return result
        rows = [self._sampling_row(requests[i]) for i in sample_at]
        bitmask = batch_bitmask([requests[i] for i in sample_at])   # None unless a request is constrained
        out: SamplerOutput = self.sampler(logits, rows, bitmask)
        for j, i in enumerate(sample_at):
            k = order[i]   # back to the batch's own order
            result.token_ids[k] = out.token_ids[j]
            if out.logprobs is not None:
                result.logprobs[k] = out.logprobs[j]
                result.top_logprobs[k] = out.top_logprobs[j]
        return result

    @torch.inference_mode()
    def run_model(self, inputs: ModelInputs) -> torch.Tensor | None:
        """The forward pass and the logits of ``inputs.logits_indices`` (None when there are none to compute)."""
        graphs = self.decode_graphs
        # Graphs were captured without LoRA: a step with adapter tokens runs eagerly.
        if graphs is not None and inputs.lora is None and graphs.fits(inputs.input_ids, inputs.attention):
            hidden = graphs.forward(inputs.input_ids, inputs.positions, inputs.attention)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, ForwardBatch(inputs.attention, inputs.lora))
        if not inputs.logits_indices.numel():
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices])

    @staticmethod
    def batch_order(batch: ScheduledBatch, lora_slots: dict[int, int]) -> list[int]:
        """The flat batch's sequence order: decodes first (the attention backends take them as one group), then
        prefill chunks; within each, by LoRA slot (base requests first), so that each adapter's rows are one run."""
        return sorted(range(len(batch)), key=lambda i: (batch.num_new_tokens[i] > 1,
                                                        lora_slots.get(id(batch.requests[i]), -1)))

    def _lora_slots_of(self, requests: list[Request]) -> dict[int, int]:
        """id(request) -> its adapter's slot, for the step's LoRA requests (their adapters made resident)."""
        names = {r.adapter.name for r in requests if r.adapter is not None and r.adapter.is_lora}
        if not names:
            return {}
        slot_of = self.lora_slots.activate(names)
        return {id(r): slot_of[r.adapter.name] for r in requests if r.adapter is not None and r.adapter.is_lora}

    def _sampling_row(self, request: Request) -> SamplingRow:
        if request.params.seed is not None and request.generator is None:
            request.generator = torch.Generator(self.device).manual_seed(request.params.seed)
        return SamplingRow(request.params, request.prompt_token_ids, request.output_token_ids, request.generator)
