"""Split-KV for the attention kernels: how many splits a launch gets, which keys each split owns, and the merge.

A decode (or short extend) launch has few programs when the batch is small: one per (sequence, KV head) cannot
fill 132 SMs. Cutting each sequence's keys into ``num_splits`` ranges multiplies the programs; each split writes
its normalised partial output and log-sum-exp, and ``merge_splits`` combines them.

Who owns which keys (``split_range``, the same in every kernel): a sequence's ``BLOCK_N``-token tiles are shared
out in equal runs of at least ``MIN_TILES_PER_SPLIT`` tiles, so only the first ``active_splits(...)`` splits of a
sequence hold keys. The split count is a launch-wide upper bound; a sequence shorter than the longest (or a
CUDA-graph step, whose split count is fixed from the longest possible context) leaves its later splits empty. An
empty split only writes its log-sum-exp as -inf; the merge reads the partial output of a split only where its
log-sum-exp is finite, so neither writes nor reads the empty splits' outputs.
"""
from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

BLOCK_N = 64                   # KV tokens per tile (decode and extend)
MIN_TOKENS_PER_SPLIT = 128     # below this a split's fixed cost (query load, partial write, merge) dominates
MIN_TILES_PER_SPLIT = MIN_TOKENS_PER_SPLIT // BLOCK_N
PROGRAMS_PER_SM = 4            # enough resident programs per SM to keep its loads in flight (bench/RESULTS.md)
MAX_SPLITS = 256               # 32K tokens at 128 a split; at batch 1 x 2 KV heads that is 512 programs
# Splits the merge reads per loop step (one compiled merge for any split count). Its loads feed no tl.dot and
# are not pipelined, so a step costs a memory latency: 32 splits a step in 4 warps take 64 registers (ptxas,
# sm_90), eight programs an SM, for the large batches whose merges have many programs and few steps.
MERGE_BLOCK_S = 32
MERGE_NUM_WARPS = 4


@functools.lru_cache(maxsize=None)
def _device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2   # the CPU interpreter runs programs one by one: few splits (and merges) keep tests fast


def num_sms(device: torch.device | str) -> int:
    return _device_sms(torch.device(device))


def choose_num_splits(programs: int, num_kv_heads: int, max_seq_len: int, device: torch.device | str | None = None,
                      *, sms: int | None = None) -> int:
    """Splits per (program, KV head) for ``programs`` sequences (or query tiles) whose longest key range is
    ``max_seq_len``: about ``PROGRAMS_PER_SM`` programs per SM, while every split keeps at least
    ``MIN_TOKENS_PER_SPLIT`` tokens. ``sms`` overrides the device's SM count (the sm_90 compile report and the
    bandwidth model use the H100's 132)."""
    sms = sms if sms is not None else num_sms(device if device is not None else "cpu")
    grid = max(1, programs * num_kv_heads)
    wanted = math.ceil(PROGRAMS_PER_SM * sms / grid)
    useful = math.ceil(max(1, max_seq_len) / MIN_TOKENS_PER_SPLIT)
    return max(1, min(wanted, useful, MAX_SPLITS))


def split_bounds(num_keys: int, split: int, num_splits: int) -> tuple[int, int]:
    """Host mirror of ``split_range``: the [start, end) keys split ``split`` owns (start >= end: none)."""
    tiles = -(-num_keys // BLOCK_N)
    per_split = max(-(-tiles // num_splits), MIN_TILES_PER_SPLIT)
    start = split * per_split * BLOCK_N
    return start, min(start + per_split * BLOCK_N, num_keys)


def active_splits(num_keys: int, num_splits: int) -> int:
    """How many of ``num_splits`` splits hold keys for a range of ``num_keys`` keys."""
    return sum(1 for s in range(num_splits) if split_bounds(num_keys, s, num_splits)[0] < num_keys)


@triton.jit
def split_range(num_keys, split, num_splits, BLOCK_N: tl.constexpr, MIN_TILES: tl.constexpr):
    """The [start, end) keys of ``split``: equal runs of at least MIN_TILES tiles; later splits may be empty."""
    tiles = tl.cdiv(num_keys, BLOCK_N)
    per_split = tl.maximum(tl.cdiv(tiles, num_splits), MIN_TILES)
    start = split * per_split * BLOCK_N
    end = tl.minimum(start + per_split * BLOCK_N, num_keys)
    return start, end


@triton.jit(do_not_specialize=["num_splits"])
def _merge_splits_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh,
    num_splits,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # One program per (row, head): the log-sum-exp weighted sum of the splits' normalised outputs, BLOCK_S splits
    # per loop step (one compiled kernel for every split count), rescaled online as the running max grows.
    # A row's splits holding keys come first (split_range hands out key runs in order, and an extend row sees
    # keys 0..its own position), so the loop stops at the first step with none: a CUDA-graph step sized for 32K
    # tokens reads one step of log-sum-exps for a 1K sequence, not 256 splits' worth.
    row = tl.program_id(0)
    head = tl.program_id(1)
    row0 = (row.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < HEAD_DIM

    m = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)   # running max of the lse (log2 units)
    acc = tl.zeros([BLOCK_D], tl.float32)
    total = tl.zeros([BLOCK_S], tl.float32)
    s0 = 0
    lse = tl.load(part_lse_ptr + row0 + s, mask=s < num_splits, other=float("-inf"))
    more = tl.max(lse, 0) > float("-inf")
    while more:
        # Only splits that hold keys wrote an output: the others' rows are never read (a masked load gives 0),
        # so neither their memory traffic nor their uninitialised contents (NaN times a weight of 0) get in.
        held = lse > float("-inf")
        parts = tl.load(part_out_ptr + (row0 + s0 + s)[:, None] * HEAD_DIM + d[None, :],
                        mask=held[:, None] & d_mask[None, :], other=0.0)           # [BLOCK_S, BLOCK_D]
        # The next step's lse, loaded beside this step's outputs: one memory latency a step, not two.
        nxt = s0 + BLOCK_S + s
        lse_next = tl.load(part_lse_ptr + row0 + nxt, mask=nxt < num_splits, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        alpha = tl.exp2(m - m_new)                              # m_new is finite: this step holds a key
        w = tl.exp2(lse - m_new)                                # 0 for a split without keys
        acc = acc * alpha + tl.sum(parts * w[:, None], 0)
        total = total * alpha + w
        m = m_new
        s0 += BLOCK_S
        lse = lse_next
        more = tl.max(lse, 0) > float("-inf")
    denom = tl.sum(total, 0)
    o = acc / tl.where(denom > 0, denom, 1.0)                    # no split holds a key: zeros
    tl.store(out_ptr + row * stride_ob + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def merge_splits(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor) -> None:
    """part_out: [R, H, S, D] float32 (each split's normalised output), part_lse: [R, H, S] (log2 units, -inf
    for a split without keys, whose part_out row may be unwritten; per row and head the splits with keys come
    first) -> out [R, H, D]: per row and head, the log-sum-exp weighted sum of the splits (zeros where no split
    holds a key)."""
    rows, num_heads, num_splits, head_dim = part_out.shape
    if rows == 0:
        return
    _merge_splits_kernel[(rows, num_heads)](
        part_out, part_lse, out,
        out.stride(0), out.stride(1),
        num_splits,
        HEAD_DIM=head_dim, BLOCK_S=MERGE_BLOCK_S, BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=MERGE_NUM_WARPS,
    )
