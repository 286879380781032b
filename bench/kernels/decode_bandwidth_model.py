"""A model of paged decode attention on an H100, made before any measurement: bytes moved, programs, pipeline
depth and occupancy (from the sm_90 compile of the kernels) -> predicted time and bandwidth. The predictions go
to bench/RESULTS.md, to be checked against bench/gpu_check.sh's kernel figures (do_bench_cudagraph).

  python -m glmserve.bench.kernels.decode_bandwidth_model     (compiles the decode and merge kernels for sm_90)

The model, per decode-attention call (the split kernel, then the merge when there is more than one split):
- programs holding keys P = batch x KV heads x active splits (split_kv.py); at most R per SM are resident, R from
  the compiled kernel's shared memory, registers and warps (the H100: 228 KB shared memory, 64K registers and 64
  warps per SM, 132 SMs);
- a resident program keeps ``load_buffers`` K+V tiles (2 x 64 tokens x 128 x 2 B = 32 KB each) in flight, so
  the bytes in flight are min(P, 132 R) x buffers x 32 KB, and latency caps the bandwidth at in-flight bytes /
  DRAM latency (Little's law); the card caps it at ATTAINABLE x 3.35 TB/s;
- split kernel time = fixed cost + one DRAM latency (the first tile) + (KV bytes + partials written) / bandwidth;
- merge time = fixed cost + max(waves x latencies, partial bytes / bandwidth), waves = programs / resident slots:
  its loads feed no tl.dot and are not pipelined, so a program waits one latency for its first log-sum-exps and
  one more per step of MERGE_BLOCK_S splits holding keys (the reviewed merge: one step over every split, its
  outputs loaded after its log-sum-exps, two latencies).
Assumed, not measured (the GPU run checks them): DRAM latency under load 1 us, 2 us fixed cost per kernel in a
CUDA graph (launch, ramp-up, tail), 90% of the 3.35 TB/s peak attainable.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import asdict, dataclass

from glmserve.kernels.triton.split_kv import (BLOCK_N, MERGE_BLOCK_S, active_splits, choose_num_splits,
                                              split_bounds)

PEAK_BYTES_S = 3.35e12           # H100 SXM HBM3
ATTAINABLE = 0.90
LATENCY_S = 1.0e-6
KERNEL_FIXED_S = 2.0e-6
SMS = 132
SM_SHARED_BYTES = 228 * 1024
SM_REGISTERS = 65536
SM_WARPS = 64
SM_BLOCKS = 32
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, DTYPE_BYTES = 32, 2, 128, 2     # ChatGLM3-6B, bf16/fp16 caches


@dataclass(frozen=True)
class KernelResources:
    """What the sm_90 compile says about one kernel (bench/kernels/triton_compile.py)."""

    shared_bytes: int
    registers: int
    num_warps: int
    load_buffers: int

    def resident_per_sm(self) -> int:
        by_shared = SM_SHARED_BYTES // (self.shared_bytes + 1024)        # 1 KB reserved per block
        regs_per_warp = math.ceil(self.registers * 32 / 256) * 256       # allocated per warp in units of 256
        by_registers = SM_REGISTERS // (regs_per_warp * self.num_warps)
        return max(1, min(by_shared, by_registers, SM_WARPS // self.num_warps, SM_BLOCKS))


@dataclass(frozen=True)
class SplitPolicy:
    """How a code version splits the keys and what its empty splits cost."""

    name: str
    programs_per_sm: int
    min_tokens_per_split: int
    max_splits: int
    min_tiles_per_split: int         # 0: a split takes cdiv(tiles, splits) tiles, however few
    empty_splits_write: bool         # empty splits write a partial output, and the merge reads every split
    merge_block_s: int | None        # splits per merge step (None: all in one step)

    def splits(self, batch: int, max_seq_len: int) -> int:
        wanted = math.ceil(self.programs_per_sm * SMS / max(1, batch * NUM_KV_HEADS))
        useful = math.ceil(max(1, max_seq_len) / self.min_tokens_per_split)
        return max(1, min(wanted, useful, self.max_splits))

    def active(self, context: int, splits: int) -> tuple[int, int]:
        """(splits holding keys, most tiles one split holds)."""
        tiles = -(-context // BLOCK_N)
        if self.min_tiles_per_split:
            held = active_splits(context, splits)
            start, end = split_bounds(context, 0, splits)
            return held, -(-(end - start) // BLOCK_N)
        per_split = -(-tiles // splits)
        return -(-tiles // per_split) if tiles else 0, per_split


# The bf16 decode (split-KV variant) and merge kernels as triton compiles them for sm_90 (bench/RESULTS.md;
# tests/test_sm90_compile.py checks the installed version's against a fresh compile). Triton 3.6, on the GPU
# machine, gives the decode 90 registers: two programs per SM instead of three.
RECORDED_SM90 = {
    "3.9": (KernelResources(shared_bytes=72192, registers=74, num_warps=8, load_buffers=2),
            KernelResources(shared_bytes=2048, registers=64, num_warps=4, load_buffers=1)),
    "3.6": (KernelResources(shared_bytes=72192, registers=90, num_warps=8, load_buffers=2),
            KernelResources(shared_bytes=2048, registers=63, num_warps=4, load_buffers=1)),
}
DECODE_SM90, MERGE_SM90 = RECORDED_SM90["3.9"]


def recorded_resources(triton_version: str) -> tuple[KernelResources, KernelResources]:
    """(decode, merge) as recorded for this triton's major.minor version (3.9's for others)."""
    return RECORDED_SM90.get(".".join(triton_version.split(".")[:2]), RECORDED_SM90["3.9"])
THIS_CODE = SplitPolicy("this code", 4, 128, 256, 2, False, MERGE_BLOCK_S)
REVIEWED_CODE = SplitPolicy("reviewed code", 2, 256, 128, 0, True, None)
# The reviewed decode kernel compiled the same way (triton 3.9, sm_90, num_warps 8, default 3 stages): one K/V
# buffer, so no load overlaps the tile being multiplied.
REVIEWED_DECODE = KernelResources(shared_bytes=39168, registers=71, num_warps=8, load_buffers=1)
REVIEWED_MERGE = KernelResources(shared_bytes=2048, registers=40, num_warps=4, load_buffers=1)


@dataclass
class Prediction:
    code: str
    batch: int
    context: int
    mode: str                 # "eager" (splits from this context) or "graph NK" (splits from an NK model length)
    splits: int
    active_splits: int
    programs: int
    kv_mb: float
    partials_mb: float        # written by the split kernel plus read by the merge
    in_flight_mb: float
    split_us: float
    merge_us: float
    total_us: float
    tb_s: float               # KV bytes / total time
    peak_pct: float


def predict(policy: SplitPolicy, decode: KernelResources, merge: KernelResources, batch: int, context: int,
            graph_model_len: int | None = None) -> Prediction:
    split_from = graph_model_len or context
    splits = policy.splits(batch, split_from)
    held, tiles_per_split = policy.active(context, splits)
    programs_held = batch * NUM_KV_HEADS * held
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * DTYPE_BYTES
    tile_bytes = 2 * BLOCK_N * HEAD_DIM * DTYPE_BYTES
    slots = decode.resident_per_sm() * SMS
    in_flight = min(programs_held, slots) * min(decode.load_buffers, max(1, tiles_per_split)) * tile_bytes
    bandwidth = min(ATTAINABLE * PEAK_BYTES_S, in_flight / LATENCY_S)
    partial_row = (HEAD_DIM + 1) * 4                                 # one split's output and lse, float32
    written = batch * NUM_HEADS * (splits if policy.empty_splits_write else held) * partial_row if splits > 1 else 0
    split_s = KERNEL_FIXED_S + LATENCY_S + (kv_bytes + written) / bandwidth
    merge_s = 0.0
    if splits > 1:
        read_splits = splits if policy.empty_splits_write else held
        read = batch * NUM_HEADS * read_splits * partial_row
        latencies = 1 + math.ceil(held / policy.merge_block_s) if policy.merge_block_s else 2
        waves = math.ceil(batch * NUM_HEADS / (merge.resident_per_sm() * SMS))
        merge_s = KERNEL_FIXED_S + max(waves * latencies * LATENCY_S, read / (ATTAINABLE * PEAK_BYTES_S))
    else:
        read = 0
    total = split_s + merge_s
    return Prediction(policy.name, batch, context, f"graph {graph_model_len // 1024}K" if graph_model_len else "eager",
                      splits, held, batch * NUM_KV_HEADS * splits, round(kv_bytes / 2**20, 2),
                      round((written + read) / 2**20, 2), round(in_flight / 2**20, 2), round(split_s * 1e6, 1),
                      round(merge_s * 1e6, 1), round(total * 1e6, 1), round(kv_bytes / total / 1e12, 2),
                      round(100 * kv_bytes / total / PEAK_BYTES_S, 1))


CASES = ((1, 1024, None), (1, 1024, 8192), (1, 1024, 32768), (1, 32768, None),
         (64, 1024, None), (64, 1024, 32768), (64, 32768, None))


def predictions(decode: KernelResources, merge: KernelResources) -> list[tuple[Prediction, Prediction]]:
    """(this code, the reviewed code) for each case."""
    for batch, context, _ in CASES:      # the model splits as the engine does
        assert THIS_CODE.splits(batch, context) == choose_num_splits(batch, NUM_KV_HEADS, context, sms=SMS)
    return [(predict(THIS_CODE, decode, merge, b, c, g),
             predict(REVIEWED_CODE, REVIEWED_DECODE, REVIEWED_MERGE, b, c, g)) for b, c, g in CASES]


def markdown(rows: list[tuple[Prediction, Prediction]]) -> str:
    lines = ["| batch | context | splits from | splits (holding keys) | programs | KV MB | partials MB | "
             "in flight MB | split + merge us | predicted TB/s | % of 3.35 | reviewed code: splits, us, TB/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for new, old in rows:
        mode = "this context" if new.mode == "eager" else f"the {new.mode[6:]} model (CUDA graph)"
        lines.append(f"| {new.batch} | {new.context // 1024}K | {mode} | {new.splits} ({new.active_splits}) | "
                     f"{new.programs} | {new.kv_mb:g} | {new.partials_mb:g} | {new.in_flight_mb:g} | "
                     f"{new.split_us:g} + {new.merge_us:g} = {new.total_us:g} | {new.tb_s:g} | {new.peak_pct:g} | "
                     f"{old.splits} ({old.active_splits}), {old.total_us:g}, {old.tb_s:g} |")
    return "\n".join(lines)


def compiled_resources() -> tuple[KernelResources, KernelResources]:
    """The bf16 decode (split-KV variant) and merge kernels compiled for sm_90 now."""
    import torch

    from glmserve.bench.kernels.triton_launches import compile_launch, record_launches
    from glmserve.kernels.triton.decode_attention import paged_decode_attention
    query = torch.empty(1, NUM_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    cache = torch.empty(4, 16, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    with record_launches(execute=False) as launches:
        paged_decode_attention(query, cache, cache, torch.zeros(1, 4, dtype=torch.int32),
                               torch.ones(1, dtype=torch.int32), 0.1, num_splits=2)
    found = []
    for launch in launches:
        v = compile_launch(launch)
        if v.error:
            raise RuntimeError(f"{v.kernel}: {v.error}")
        found.append(KernelResources(v.shared_bytes, v.registers, v.num_warps, v.load_buffers))
    return found[0], found[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmserve.bench.kernels.decode_bandwidth_model",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recorded", choices=sorted(RECORDED_SM90),
                        help="use this triton version's recorded sm_90 figures instead of compiling now")
    args = parser.parse_args(argv)
    from glmserve.bench.kernels.triton_launches import cuda_target_unavailable
    reason = None if args.recorded else cuda_target_unavailable()
    if args.recorded or reason:
        import triton
        version = args.recorded or triton.__version__
        print(f"the recorded sm_90 figures of triton {version}" + (f" (cannot compile here: {reason})" if reason else ""))
        decode, merge = recorded_resources(version)
    else:
        decode, merge = compiled_resources()
    print(f"decode: {asdict(decode)}, {decode.resident_per_sm()} resident per SM; merge: {asdict(merge)}, "
          f"{merge.resident_per_sm()} resident per SM")
    print(markdown(predictions(decode, merge)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
