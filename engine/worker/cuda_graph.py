"""CUDA graphs for decode-only steps: the model's forward captured once per padded batch size, then replayed.

Why: a ChatGLM3-6B decode step launches ~15 small kernels per layer x 28 layers; at batch 64 the GPU finishes
them faster than Python issues them, so the step is launch-bound, not bandwidth-bound. A replayed graph issues
them all at once. (The same trick as vLLM's and nano-vllm's decode graphs, written for this runner.)

How: the graphs read from static input buffers sized for ``max_batch`` sequences. A step of ``n`` decodes takes
the smallest captured size ``b >= n``, copies its inputs into the first ``n`` rows and fills rows ``n..b`` with
padding (slot -1: no KV write; context length 1 on block 0: a harmless read; its output is never used). Attention
metadata is static too: ``max_seq_len`` is the model length, so the Triton backend's split count is fixed at
capture. The output layer and the sampler stay eager: the graph returns final hidden states.

The capture itself is behind ``GraphCapture`` so the buffer and padding logic is tested on the CPU with
``EagerReplay`` (which re-runs the recorded function on the same static buffers); ``CudaGraphCapture`` is the real
one.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from glmserve.engine.attention.metadata import AttentionMetadata
from glmserve.engine.model.forward_batch import ForwardBatch


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, 8, then every multiple of 16 up to ``max_batch`` (and ``max_batch``)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch, 16)) + [max_batch]
    return sorted(set(sizes))


class GraphCapture(Protocol):
    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """Record ``fn`` (which reads only static buffers) and return a replay that returns its output."""
        ...


class EagerReplay:
    """A stand-in capture for the CPU: replay re-runs the function eagerly on the (updated) static buffers."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        return fn


class CudaGraphCapture:
    """Real CUDA graphs; every size shares one memory pool (captured largest first, as the pool prefers)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        # Warm up outside the graph first: Triton compiles its kernels and the allocator sees the shapes.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = fn()
        torch.cuda.synchronize(self.device)

        def replay() -> torch.Tensor:
            graph.replay()
            return output
        return replay


@dataclass
class _StaticInputs:
    """Buffers every graph reads: [max_batch] rows (block tables [max_batch, max_blocks_per_seq])."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    query_start_loc: torch.Tensor     # [max_batch + 1] = 0, 1, 2, ...: one token per sequence, never changes


class DecodeGraphs:
    """Captured decode forwards of ``model`` for batch sizes up to ``max_batch``.

    ``model(input_ids [T], positions [T], batch) -> hidden [T, hidden]`` must already be bound to its KV cache.
    """

    def __init__(self, model: torch.nn.Module, *, max_batch: int, max_model_len: int, block_size: int,
                 device: torch.device, capture: GraphCapture):
        self.model = model
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.sizes = capture_sizes(max_batch)
        self.replays = 0                  # decode steps served by a graph (tests and benchmarks read it)
        i64, i32 = dict(dtype=torch.int64, device=device), dict(dtype=torch.int32, device=device)
        self.static = _StaticInputs(
            input_ids=torch.zeros(max_batch, **i64), positions=torch.zeros(max_batch, **i64),
            slot_mapping=torch.full((max_batch,), -1, **i64), seq_lens=torch.ones(max_batch, **i32),
            block_tables=torch.zeros(max_batch, self.max_blocks, **i32),
            query_start_loc=torch.arange(max_batch + 1, **i32))
        self._graphs: dict[int, Callable[[], torch.Tensor]] = {}
        with torch.inference_mode():
            for size in reversed(self.sizes):
                self._graphs[size] = capture.capture(self._forward_fn(size))

    def _forward_fn(self, size: int) -> Callable[[], torch.Tensor]:
        s = self.static
        input_ids, positions = s.input_ids[:size], s.positions[:size]
        batch = ForwardBatch(AttentionMetadata(slot_mapping=s.slot_mapping[:size], query_start_loc=s.query_start_loc[:size + 1],
                                 seq_lens=s.seq_lens[:size], block_tables=s.block_tables[:size], num_decodes=size,
                                 max_query_len=1, max_seq_len=self.max_model_len))

        def forward() -> torch.Tensor:
            return self.model(input_ids, positions, batch)
        return forward

    def fits(self, input_ids: torch.Tensor, meta: AttentionMetadata) -> bool:
        """A decode-only step (one token per sequence) small enough for a captured size."""
        n = input_ids.shape[0]
        return (0 < n <= self.sizes[-1] and meta.num_decodes == n and meta.seq_lens.shape[0] == n
                and meta.block_tables.shape[1] <= self.max_blocks and meta.max_seq_len <= self.max_model_len)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [n, hidden] of a step that ``fits``."""
        n = input_ids.shape[0]
        size = next(b for b in self.sizes if b >= n)
        s = self.static
        s.input_ids[:n].copy_(input_ids)
        s.positions[:n].copy_(positions)
        s.slot_mapping[:n].copy_(meta.slot_mapping)
        s.seq_lens[:n].copy_(meta.seq_lens)
        # Columns past this step's width keep older block ids: valid indices, never read (beyond seq_lens).
        s.block_tables[:n, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        if size > n:                      # padding rows: no KV write, one token of context on block 0
            s.input_ids[n:size].zero_()
            s.positions[n:size].zero_()
            s.slot_mapping[n:size].fill_(-1)
            s.seq_lens[n:size].fill_(1)
            s.block_tables[n:size].zero_()
        self.replays += 1
        return self._graphs[size]()[:n]
