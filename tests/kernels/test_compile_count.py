"""No Triton compile after the start-up warm-up: every kernel variant a server launches is compiled when the engine
is built (engine/attention/triton_warmup.py), never during the first requests.

What is counted: a compile happens when a launch needs a binary Triton's JIT has not built yet, i.e. a launch
whose JIT cache key (the kernel, every argument's specialisation, the constexprs and options) is new. On the CPU
the interpreter compiles nothing, so each launch's key is computed as a CUDA device would
(bench/kernels/triton_launches.py ``launch_key``, triton's own binder for an sm_90 target); a key first seen after
the warm-up is a compile the server would do while serving. On a GPU the JIT's real caches are counted too.
"""
from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from glmserve.bench.kernels.triton_launches import (Launch, cuda_target_unavailable, launch_key, record_launches,
                                                    triton_kernels)
from glmserve.engine.attention.triton_backend import TritonAttentionBackend
from glmserve.engine.config.model_config import MODEL_PRESETS
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.model.checkpoint_writer import write_checkpoint
from glmserve.engine.text.tokenizer import embedded_tokenizer_path
from glmserve.engine.worker.cuda_graph import EagerReplay
from glmserve.kernels.triton.decode_attention import paged_decode_attention
from glmserve.kernels.triton.extend_attention import paged_extend_attention

from ..engine_helpers import assert_no_leaks, make_engine, run_to_completion

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_UNAVAILABLE = cuda_target_unavailable()
pytestmark = pytest.mark.skipif(_UNAVAILABLE is not None, reason=f"no CUDA target in this triton: {_UNAVAILABLE}")


def _jit_cache_sizes() -> int:
    """Binaries in the JIT caches of all of glmserve's kernels (on a GPU)."""
    return sum(len(caches[0]) for kernel in triton_kernels() for caches in kernel.device_caches.values())


@pytest.fixture(scope="module")
def grouped_checkpoint(tmp_path_factory):
    # glm-tiny with one layer (the interpreter runs every program one by one): 4 query heads in 2 KV groups, so
    # extend has four query-tile variants (8, 16, 32 and 64 tokens).
    config = dataclasses.replace(MODEL_PRESETS["glm-tiny"], num_layers=1)
    return write_checkpoint(tmp_path_factory.mktemp("grouped"), config, embedded_tokenizer_path(),
                            dtype=torch.float32, seed=3)


def _mixed_workload(vocab: int) -> dict[int, list[tuple]]:
    """Requests arriving over several steps: prompts of 2-140 tokens, some sharing a 40-token prefix (prefix-cache
    hits: a short chunk over a cached context), outputs of 1-12 tokens, so decode batches of 1-8 sequences at many
    contexts run beside chunked prefills."""
    rng = random.Random(7)
    prefix = [rng.randrange(3, vocab) for _ in range(40)]
    arrivals: dict[int, list[tuple]] = {}
    for i in range(12):
        length = rng.choice([2, 3, 9, 17, 33, 64, 140])
        prompt = [rng.randrange(3, vocab) for _ in range(length)]
        if i % 3 == 2:
            prompt = prefix + prompt[:5]
        params = SamplingParams(temperature=0.0, max_tokens=1 + (5 * i) % 12, ignore_eos=True)
        arrivals.setdefault(3 * (i // 2), []).append((f"r{i}", prompt, params))
    return arrivals


def test_nothing_compiles_after_the_warm_up(grouped_checkpoint, monkeypatch):
    monkeypatch.setattr(TritonAttentionBackend, "warmup_in_interpreter", True)
    with record_launches() as launches:
        engine = make_engine(str(grouped_checkpoint), attention_backend="triton", max_model_len=192,
                             max_num_batched_tokens=40, max_num_seqs=8, num_kv_blocks=96, device=DEVICE,
                             dtype="float32")
        warm = list(launches)
        compiled_after_warm_up = _jit_cache_sizes() if DEVICE == "cuda" else 0
        launches.clear()
        engine.runner.enable_decode_graphs(EagerReplay(), max_batch=4)     # the CUDA-graph path's launches too
        run_to_completion(engine, _mixed_workload(engine.tokenizer.vocab_size))
        served = list(launches)
    assert_no_leaks(engine)
    assert engine.runner.decode_graphs.replays > 0

    warm_keys = {launch_key(launch) for launch in warm}
    kernels_warmed = {launch.name for launch in warm}
    assert kernels_warmed == {"_write_kv_cache_kernel", "_decode_split_kernel", "_extend_kernel",
                              "_merge_splits_kernel"}
    # The run was varied: decodes in batches of several sizes, extends in several query-tile sizes.
    decode_batches = {launch.grid[0] for launch in served if launch.name == "_decode_split_kernel"}
    tiles = {launch.kwargs["BLOCK_T"] for launch in served if launch.name == "_extend_kernel"}
    assert len(decode_batches) >= 4 and len(tiles) >= 3, (decode_batches, tiles)
    assert any(launch.name == "_merge_splits_kernel" for launch in served)

    new = sorted({launch_key(launch) for launch in served} - warm_keys)
    assert not new, f"{len(new)} variants compiled while serving: {new}"
    if DEVICE == "cuda":
        assert _jit_cache_sizes() == compiled_after_warm_up


def _key_of(fn) -> list[str]:
    with record_launches(execute=False) as launches:
        fn()
    return [launch_key(launch) for launch in launches]


def test_launch_keys_see_variants_but_not_the_integers_that_change_every_step():
    """The count above can fail: a key changes with each compiled variant, and with any specialised integer."""
    def decode(batch, width, splits):
        query = torch.empty(batch, 32, 128, dtype=torch.float16)
        cache = torch.empty(4, 16, 2, 128, dtype=torch.float16)
        tables = torch.zeros(batch, width, dtype=torch.int32)
        lens = torch.ones(batch, dtype=torch.int32)
        return lambda: paged_decode_attention(query, cache, cache, tables, lens, 0.1, num_splits=splits)

    split_a, merge_a = _key_of(decode(2, 16, 2))
    split_b, merge_b = _key_of(decode(3, 17, 5))            # another width, split count and batch: same binaries
    (direct,) = _key_of(decode(1, 1, 1))
    assert (split_a, merge_a) == (split_b, merge_b)
    assert direct != split_a

    def extend(max_query_len):
        query = torch.empty(8, 32, 128, dtype=torch.float16)
        cache = torch.empty(4, 16, 2, 128, dtype=torch.float16)
        starts = torch.tensor([0, 8], dtype=torch.int32)
        return lambda: paged_extend_attention(query, cache, cache, torch.zeros(1, 4, dtype=torch.int32), starts,
                                              torch.tensor([8], dtype=torch.int32), 0.1, max_query_len,
                                              num_splits=1)
    assert _key_of(extend(2)) != _key_of(extend(8))          # query tiles of 2 and 8 tokens

    # A twin of the decode kernel that specialises every integer, as the kernels did before: the block table's
    # width (16 vs 17) then needs two binaries, which the key shows.
    import triton

    from glmserve.kernels.triton import decode_attention
    kernel = decode_attention._decode_split_kernel
    eager_twin = triton.jit(kernel.fn)
    with record_launches(execute=False) as launches:
        decode(2, 16, 2)()
        decode(2, 17, 2)()
    first, second = (Launch(eager_twin, l.grid, l.args, l.kwargs) for l in launches if l.kernel is kernel)
    assert launch_key(first) != launch_key(second)
