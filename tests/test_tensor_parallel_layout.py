"""Tensor-parallel sharding without processes: which rows and columns each rank takes, the refusals, the per-rank
parameter bytes, and the sharded forward pass (ranks as threads with an in-memory all-reduce) against the
one-process model for every load path (dummy, safetensors, .bin, int8 and int4)."""
from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from glmserve.engine.attention.backends import make_attention_backend
from glmserve.engine.attention.metadata import AttentionMetadata
from glmserve.engine.model.forward_batch import ForwardBatch
from glmserve.engine.model.checkpoint_writer import write_checkpoint
from glmserve.engine.config.errors import ConfigError
from glmserve.engine.config.model_config import MODEL_PRESETS, ModelConfig
from glmserve.engine.model.loader import ModelSource, load_model, resolve_model_source
from glmserve.engine.model.glm import GLMForCausalLM
from glmserve.engine.model.shard_layout import ShardLayout, TensorSlice
from glmserve.engine.text.tokenizer import embedded_tokenizer_path

GLM3 = MODEL_PRESETS["chatglm3-6b"]
LAYER = "transformer.encoder.layers.0."


# ---- which rows and columns (numbers from GLM3_FACTS: 32 heads x 128, 2 groups, ffn 13696, vocab 65024) --------
def test_qkv_takes_the_query_heads_and_the_kv_groups_they_read():
    qkv = LAYER + "self_attention.query_key_value.weight"
    # N = 2: rank 1 has heads 16..31 and group 1; K rows start at 4096, V rows at 4352.
    assert ShardLayout(GLM3, 1, 2).tensor_slice(qkv) == TensorSlice(0, ((2048, 4096), (4224, 4352), (4480, 4608)))
    # N = 4: heads 8..15 read group 0, heads 16..23 group 1 (replicated: ranks 0,1 hold group 0, ranks 2,3 group 1)
    assert ShardLayout(GLM3, 1, 4).tensor_slice(qkv) == TensorSlice(0, ((1024, 2048), (4096, 4224), (4352, 4480)))
    assert ShardLayout(GLM3, 2, 4).tensor_slice(qkv) == TensorSlice(0, ((2048, 3072), (4224, 4352), (4480, 4608)))
    # N = 8: rank 7 has heads 28..31, group 1
    assert ShardLayout(GLM3, 7, 8).tensor_slice(qkv) == TensorSlice(0, ((3584, 4096), (4224, 4352), (4480, 4608)))
    assert ShardLayout(GLM3, 7, 8).tensor_slice(qkv.replace("weight", "bias")).ranges[0] == (3584, 4096)


def test_gate_and_up_halves_are_split_alike_and_row_parallel_layers_by_columns():
    layout = ShardLayout(GLM3, 1, 2)
    assert layout.tensor_slice(LAYER + "mlp.dense_h_to_4h.weight") == TensorSlice(
        0, ((6848, 13696), (13696 + 6848, 2 * 13696)))
    assert layout.tensor_slice(LAYER + "mlp.dense_4h_to_h.weight") == TensorSlice(1, ((6848, 13696),))
    assert layout.tensor_slice(LAYER + "self_attention.dense.weight") == TensorSlice(1, ((2048, 4096),))
    assert layout.tensor_slice("transformer.output_layer.weight") == TensorSlice(0, ((32512, 65024),))
    assert layout.tensor_slice("transformer.embedding.word_embeddings.weight") == TensorSlice(0, ((32512, 65024),))
    assert layout.tensor_slice(LAYER + "input_layernorm.weight") is None
    assert ShardLayout(GLM3, 0, 1).tensor_slice(LAYER + "mlp.dense_h_to_4h.weight") is None


@pytest.mark.parametrize("n, kv_heads", [(1, 2), (2, 1), (4, 1), (8, 1)])
def test_kv_cache_holds_the_rank_share_of_kv_heads(n, kv_heads):
    local = ShardLayout(GLM3, 0, n).local_config
    assert (local.num_kv_heads, local.num_attention_heads) == (kv_heads, 32 // n)
    assert local.kv_bytes_per_token(2) == 28 * 2 * kv_heads * 128 * 2


@pytest.mark.parametrize("changes, n, message", [
    ({}, 3, "must divide num_attention_heads"),
    (dict(num_attention_heads=6, multi_query_group_num=2), 3, "must divide the number of KV groups"),
    (dict(num_attention_heads=8, multi_query_group_num=4), 8, None),            # replicated: fine
    (dict(ffn_hidden_size=13697), 2, "must divide ffn_hidden_size"),
    (dict(padded_vocab_size=65025), 2, "must divide padded_vocab_size"),
])
def test_unsplittable_models_are_refused_clearly(changes, n, message):
    config = dataclasses.replace(GLM3, **changes)
    if message is None:
        ShardLayout(config, 0, n)
    else:
        with pytest.raises(ConfigError, match=message):
            ShardLayout(config, 0, n)


# ---- memory: each rank holds ~1/N of the weights -----------------------------------------------------------------
def _parameter_bytes(config: ModelConfig, rank: int, n: int) -> int:
    with torch.device("meta"):
        model = GLMForCausalLM(config, ShardLayout(config, rank, n), _PLACEHOLDER_GROUP if n > 1 else None)
    return sum(p.numel() * 2 for p in model.parameters())    # as fp16


@pytest.mark.parametrize("preset", ["chatglm3-6b", "glm-small"])
@pytest.mark.parametrize("n", [2, 4, 8])
def test_each_rank_holds_one_nth_plus_the_replicated_parts(preset, n):
    config = MODEL_PRESETS[preset]
    total = config.num_parameters() * 2
    per_rank = [_parameter_bytes(config, r, n) for r in range(n)]
    assert len(set(per_rank)) == 1
    h, d, layers = config.hidden_size, config.head_dim, config.num_layers
    norms = (2 * layers + 1) * h * 2
    # N > groups: each rank holds one whole KV group (K and V rows plus their bias) where 1/N would be groups/N.
    groups = config.num_kv_heads
    kv_extra = layers * 2 * d * (h + 1) * 2 * (n - groups) if n > groups else 0
    assert sum(per_rank) == total + (n - 1) * norms + kv_extra
    ratio = per_rank[0] / total
    assert ratio <= 1 / n * 1.03, f"{preset} N={n}: a rank holds {ratio:.4f} of the weights"


# ---- the sharded forward pass: ranks as threads --------------------------------------------------------------------
class ThreadGroup:
    """An in-memory stand-in for TensorParallelGroup: one thread per rank, meeting at a barrier."""

    def __init__(self, world_size: int):
        self.barrier = threading.Barrier(world_size, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * world_size

    def member(self, rank: int) -> "_Member":
        return _Member(self, rank)


class _Member:
    def __init__(self, shared: ThreadGroup, rank: int):
        self.shared, self.rank = shared, rank

    def _exchange(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.shared.slots[self.rank] = x.clone()
        self.shared.barrier.wait()
        parts = list(self.shared.slots)
        self.shared.barrier.wait()     # everyone has read before anyone writes again
        return parts

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._exchange(x)
        return x.copy_(sum(parts[1:], parts[0]))

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        parts = self._exchange(x)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None


class _Placeholder:
    """A group for models that are only measured, never run."""


_PLACEHOLDER_GROUP = _Placeholder()

SMALL = ModelConfig(num_layers=2, hidden_size=64, num_attention_heads=4, kv_channels=16, multi_query_group_num=2,
                    ffn_hidden_size=36, padded_vocab_size=256, seq_length=512, torch_dtype="float32")
# ffn 36 over 4 ranks: column slices of 9 start at odd columns, so int4 bytes are split across ranks.


def _run(models: list[GLMForCausalLM], steps: list[list[int]]) -> list[torch.Tensor]:
    """Feed one sequence through every rank's model (in threads) step by step; rank 0's logits per step."""
    block_size, num_blocks = 8, 16
    backend = make_attention_backend("torch", torch.device("cpu"))
    for model in models:
        shape = (num_blocks, block_size, model.config.num_kv_heads, model.config.head_dim)
        model.bind_runtime(backend, [(torch.zeros(shape), torch.zeros(shape)) for _ in range(SMALL.num_layers)],
                           SMALL.seq_length)
    outputs, length = [], 0
    for tokens in steps:
        n = len(tokens)
        positions = torch.arange(length, length + n)
        length += n
        meta = AttentionMetadata(slot_mapping=positions.clone(),
                                 query_start_loc=torch.tensor([0, n], dtype=torch.int32),
                                 seq_lens=torch.tensor([length], dtype=torch.int32),
                                 block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
                                 num_decodes=int(n == 1), max_query_len=n, max_seq_len=length)
        results: list[torch.Tensor | None] = [None] * len(models)

        def rank_step(rank: int) -> None:
            with torch.inference_mode():
                results[rank] = models[rank].compute_logits(models[rank](torch.tensor(tokens), positions, ForwardBatch(meta)))

        threads = [threading.Thread(target=rank_step, args=(r,)) for r in range(len(models))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(r is None for r in results[1:])
        outputs.append(results[0])
    return outputs


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-ckpts")
    tokenizer = embedded_tokenizer_path()
    return {
        "dummy": None,
        "safetensors": write_checkpoint(root / "st", SMALL, tokenizer, fmt="safetensors", shards=3, seed=5),
        "bin": write_checkpoint(root / "bin", SMALL, tokenizer, fmt="bin", shards=2, seed=5),
        "int8": write_checkpoint(root / "q8", dataclasses.replace(SMALL, quantization_bit=8), tokenizer, seed=5),
        "int4": write_checkpoint(root / "q4", dataclasses.replace(SMALL, quantization_bit=4), tokenizer,
                                 fmt="bin", shards=3, seed=5),
    }


def _load(checkpoint, rank: int, n: int, group) -> GLMForCausalLM:
    if checkpoint is None:
        source = ModelSource("small", SMALL, embedded_tokenizer_path(), "dummy")
    else:
        source = resolve_model_source(str(checkpoint))
    return load_model(source, torch.device("cpu"), torch.float32, seed=11,
                      shard=ShardLayout(source.config, rank, n) if n > 1 else None, group=group)


@pytest.mark.parametrize("kind", ["dummy", "safetensors", "bin", "int8", "int4"])
@pytest.mark.parametrize("n", [2, 4])
def test_sharded_forward_equals_one_process(checkpoints, kind, n):
    steps = [[5, 17, 200, 3, 99, 42, 7, 8, 9, 10, 11], [63], [128], [255]]
    expected = _run([_load(checkpoints[kind], 0, 1, None)], steps)
    group = ThreadGroup(n)
    got = _run([_load(checkpoints[kind], r, n, group.member(r)) for r in range(n)], steps)
    for step, (a, b) in enumerate(zip(got, expected)):
        assert a.shape == b.shape == (len(steps[step]), SMALL.padded_vocab_size)
        assert (a - b).abs().max().item() <= 1e-5, f"step {step}"


def test_a_rank_reads_only_its_share_of_each_tensor(checkpoints):
    """The rank's parameters are exactly slices of the one-process model's (rank 3 of 4: the last query heads,
    KV group 1, the last ffn slice of gate and of up, the last vocabulary rows)."""
    full = dict(_load(checkpoints["safetensors"], 0, 1, None).named_parameters())
    rank = dict(_load(checkpoints["safetensors"], 3, 4, _PLACEHOLDER_GROUP).named_parameters())
    d, f = SMALL.head_dim, SMALL.ffn_hidden_size
    qkv = full[LAYER + "self_attention.query_key_value.weight"]
    assert torch.equal(rank[LAYER + "self_attention.query_key_value.weight"],
                       torch.cat([qkv[3 * d:4 * d], qkv[4 * d + d:4 * d + 2 * d], qkv[6 * d + d:6 * d + 2 * d]]))
    h4h = full[LAYER + "mlp.dense_h_to_4h.weight"]
    assert torch.equal(rank[LAYER + "mlp.dense_h_to_4h.weight"], torch.cat([h4h[27:36], h4h[f + 27:f + 36]]))
    assert torch.equal(rank[LAYER + "mlp.dense_4h_to_h.weight"], full[LAYER + "mlp.dense_4h_to_h.weight"][:, 27:36])
    assert torch.equal(rank["transformer.output_layer.weight"], full["transformer.output_layer.weight"][192:])
