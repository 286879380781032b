"""ChatGLM3 (GLM) for causal LM, written once for the paged runtime.

Module names follow the checkpoint's tensor names (``transformer.encoder.layers.{i}.self_attention...``) so the
loader copies tensors by name. ``forward(input_ids, positions, batch)`` takes a flat batch of tokens [T] and the pass's
``ForwardBatch`` (the paged-cache metadata), which goes down to every attention layer with the call.

What runs the layer's steps comes from the attention backend the model is bound to (``bind_runtime``): its
attention kernels, its elementwise ops (``LayerOps``: norms, rotary, SwiGLU) and whether the linears run packed
through oneDNN. Bound to ``torch`` the whole model is pure torch. Unbound, the norms and the MLP compute with the
torch references.

Tensor parallel: a model built with a ``ShardLayout`` of N ranks and a ``TensorParallelGroup`` holds one rank's
share (see parallel_layout.py) and all-reduces after the row-parallel linears and the vocabulary-parallel
embedding; ``compute_logits`` gathers the vocabulary slices on rank 0. Without a group (N = 1) the model is the
plain single-process one: no collective is called.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from glmserve.engine.attention.backend import AttentionBackend
from glmserve.engine.attention.layer_ops import TORCH_LAYER_OPS, LayerOps
from glmserve.engine.config.model_config import ModelConfig
from glmserve.engine.model.cpu_linear import Linear, bind_linears, packed_weight_bytes
from glmserve.engine.model.collectives import Collectives
from glmserve.engine.model.forward_batch import ForwardBatch
from glmserve.engine.model.shard_layout import ShardLayout


class RMSNorm(nn.Module):
    """ChatGLM's RMSNorm: statistics in float32, weight applied in float32, one cast back at the end."""

    ops: LayerOps = TORCH_LAYER_OPS     # the bound backend's (bind_runtime)

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.add_rms_norm(x, None, self.weight, self.eps)[1]

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual connection and the norm in one step: (x + residual, norm(x + residual)); x may be updated
        in place, so it must be the caller's own activation. ``residual`` None: (x, norm(x))."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class RotaryEmbedding:
    """Rotary on the first half of each head, rotating adjacent pairs (x[2i], x[2i+1]) (GPT-J style).

    theta_i = base^(-2i/rotary_dim) with base = 10000 * rope_ratio; positions are not interpolated.
    Not an nn.Module: the cos/sin table is derived state, rebuilt on the model's device after loading.
    """

    def __init__(self, rotary_dim: int, base: float, max_positions: int, device: torch.device,
                 ops: LayerOps = TORCH_LAYER_OPS):
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim))
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float64, device=device), inv_freq)
        self.cos = angles.cos().float()   # [max_positions, rotary_dim/2]
        self.sin = angles.sin().float()
        self.rotary_dim = rotary_dim
        self.ops = ops

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [T, rot/2] at ``positions`` [T]: done once per forward pass and shared by every layer
        (an explicit value, not a cache keyed on the tensor, so a captured CUDA graph records the lookup)."""
        return self.cos[positions], self.sin[positions]

    def rotate_(self, x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> None:
        """In place: x [T, heads, head_dim] (a view, features contiguous); cos_sin from ``lookup``."""
        cos, sin = cos_sin
        self.ops.rotate_pairs_(x, cos, sin)


class SelfAttention(nn.Module):
    """``config`` holds this rank's heads and KV groups; ``group`` all-reduces the partial ``dense`` output."""

    def __init__(self, config: ModelConfig, group: Collectives | None = None):
        super().__init__()
        self.group = group
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        # Output rows are [Q: heads*D | K: groups*D | V: groups*D], contiguous, not interleaved per group.
        self.query_key_value = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.add_qkv_bias)
        self.dense = Linear(self.q_size, config.hidden_size, bias=False)
        self.scale = 1.0 / math.sqrt(self.head_dim)
        # Bound by the runner after the KV cache is allocated.
        self.k_cache: torch.Tensor | None = None   # [num_blocks, block_size, KVH, D]
        self.v_cache: torch.Tensor | None = None
        self.backend: AttentionBackend | None = None
        self.rotary: RotaryEmbedding | None = None

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor,
                batch: ForwardBatch) -> torch.Tensor:
        """rope: this pass's (cos, sin) from ``RotaryEmbedding.lookup``; hidden: [T, hidden]."""
        qkv = self.query_key_value(hidden)                                  # [T, (H + 2*KVH) * D]
        heads = qkv.unflatten(-1, (-1, self.head_dim))                      # [T, H + 2*KVH, D], a view
        # Q and K heads are adjacent in the fused output: one in-place rotary pass over [T, H + KVH, D].
        self.rotary.rotate_(heads[:, :self.num_heads + self.num_kv_heads], rope)
        q, k = heads[:, :self.num_heads], heads[:, self.num_heads:self.num_heads + self.num_kv_heads]
        v = heads[:, self.num_heads + self.num_kv_heads:]
        out = self.backend.forward(q, k, v, self.k_cache, self.v_cache, batch.attention, self.scale)
        out = self.dense(out.flatten(1))      # [T, hidden]; a partial sum over this rank's heads when sharded
        return out if self.group is None else self.group.all_reduce(out)


class MLP(nn.Module):
    ops: LayerOps = TORCH_LAYER_OPS     # the bound backend's (bind_runtime)

    def __init__(self, config: ModelConfig, group: Collectives | None = None):
        super().__init__()
        self.group = group
        # FIRST half of the output is the gate (SiLU), the second half the up projection.
        self.dense_h_to_4h = Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=False)
        self.dense_4h_to_h = Linear(config.ffn_hidden_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A partial sum over this rank's ffn slice when sharded.
        out = self.dense_4h_to_h(self.ops.silu_mul(self.dense_h_to_4h(x)))
        return out if self.group is None else self.group.all_reduce(out)


class GLMBlock(nn.Module):
    def __init__(self, config: ModelConfig, group: Collectives | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.self_attention = SelfAttention(config, group)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)
        self.mlp = MLP(config, group)

    def forward(self, rope: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor, pending: torch.Tensor | None,
                batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream [T, hidden]; pending: the previous block's MLP output, not yet added to x (None
        for the first block). Returns (x, this block's MLP output): each residual add is fused into the norm that
        follows it (x = x + attn(norm(x)); x = x + mlp(norm(x)), as in ChatGLM)."""
        x, h = self.input_layernorm.add_and_norm(x, pending)
        x, h = self.post_attention_layernorm.add_and_norm(x, self.self_attention(rope, h, batch))
        return x, self.mlp(h)


class Embedding(nn.Module):
    """The word embeddings: the whole table, or with a group (vocabulary-parallel) this rank's rows of it,
    [vocab_start, vocab_start + config.padded_vocab_size) of the checkpoint's."""

    def __init__(self, config: ModelConfig, group: Collectives | None = None, vocab_start: int = 0):
        super().__init__()
        self.group = group
        self.vocab_start = vocab_start
        # Left uninitialised (the loader fills it): nn.Embedding's own normal_ init imports torch._dynamo on the
        # meta device, seconds of start-up for every process.
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size,
                                            _weight=torch.empty(config.padded_vocab_size, config.hidden_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [T] -> [T, hidden]."""
        if self.group is None:
            return self.word_embeddings(input_ids)
        # Vocabulary-parallel: each id lives on exactly one rank; the others add zeros in the all-reduce.
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.word_embeddings.num_embeddings)
        x = self.word_embeddings(local.masked_fill(outside, 0))
        return self.group.all_reduce(x.masked_fill(outside[:, None], 0.0))


class Encoder(nn.Module):
    def __init__(self, config: ModelConfig, group: Collectives | None = None):
        super().__init__()
        self.layers = nn.ModuleList(GLMBlock(config, group) for _ in range(config.num_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig, group: Collectives | None = None, vocab_start: int = 0):
        super().__init__()
        self.embedding = Embedding(config, group, vocab_start)
        self.encoder = Encoder(config, group)
        self.output_layer = Linear(config.hidden_size, config.padded_vocab_size, bias=False)


class GLMForCausalLM(nn.Module):
    """``config`` is the checkpoint's config.json; with ``shard`` (rank r of N) the model holds that rank's share
    and ``self.config`` describes the share (heads, KV groups, ffn and vocabulary rows divided by N), which is
    what the KV cache and memory sizing need. ``group`` does the collectives; it is required when N > 1."""

    def __init__(self, config: ModelConfig, shard: ShardLayout | None = None,
                 group: Collectives | None = None):
        super().__init__()
        self.shard = shard or ShardLayout(config)
        if (self.shard.world_size > 1) != (group is not None):
            raise ValueError("a sharded model needs a tensor-parallel group, and only a sharded model takes one")
        self.config = self.shard.local_config
        self.group = group
        self.transformer = Transformer(self.config, group, self.shard.vocab_start)
        self.rotary: RotaryEmbedding | None = None      # set by bind_runtime

    @property
    def weights_device(self) -> torch.device:
        # The embedding table is never packed (cpu_linear.py), so it is always there to ask.
        return self.transformer.embedding.word_embeddings.weight.device

    @property
    def weights_dtype(self) -> torch.dtype:
        return self.transformer.embedding.word_embeddings.weight.dtype

    def weight_bytes(self) -> int:
        """Bytes of all weights, packed linears included."""
        return sum(p.numel() * p.element_size() for p in self.parameters()) + packed_weight_bytes(self)

    @property
    def attention_layers(self) -> list[SelfAttention]:
        return [layer.self_attention for layer in self.transformer.encoder.layers]

    def bind_runtime(self, backend: AttentionBackend, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                     max_positions: int) -> None:
        """Attach the attention backend, each layer's KV cache and the rotary table (after weights are loaded),
        and run the layers' elementwise ops and linears as the backend says (linears packed for oneDNN, or
        unpacked: a model may be bound again to another backend)."""
        device = self.weights_device
        rotary = RotaryEmbedding(self.config.rotary_dim, self.config.rope_base, max_positions, device, backend.ops)
        self.rotary = rotary     # forward looks the positions up once; every layer rotates with that lookup
        bind_linears(self, backend.onednn_linears)
        for module in self.modules():
            if isinstance(module, (RMSNorm, MLP)):
                module.ops = backend.ops
        for attn, (k_cache, v_cache) in zip(self.attention_layers, kv_caches, strict=True):
            attn.backend, attn.k_cache, attn.v_cache, attn.rotary = backend, k_cache, v_cache, rotary

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
        """input_ids, positions: [T]. Returns final hidden states [T, hidden] (after the final norm)."""
        x = self.transformer.embedding(input_ids)
        rope = self.rotary.lookup(positions)                         # shared by every layer
        pending = None
        for layer in self.transformer.encoder.layers:
            x, pending = layer(rope, x, pending, batch)
        return self.transformer.encoder.final_layernorm.add_and_norm(x, pending)[1]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden: [N, hidden] -> float32 logits [N, padded_vocab_size] (of the checkpoint).

        Sharded: every rank projects onto its vocabulary rows and rank 0 gathers them; the other ranks get None.
        """
        logits = self.transformer.output_layer(hidden)     # [N, this rank's vocabulary rows]
        if self.group is not None:
            logits = self.group.gather_last_dim(logits)
            if logits is None:
                return None
        return logits.float()
