"""CPU linears: torch's ``F.linear`` (MKL for float32) against oneDNN with the weight as stored and prepacked.

``glmserve-bench cpu-linear [--shapes 65024x512,2736x512,...] [--rows 8,64,512] [--dtype float32|bfloat16]``
prints milliseconds per call
and multiply-adds per second for each (out x in) weight shape and row count, and the largest |difference| of each
oneDNN result from F.linear's (the numerics check). It is the measurement behind ``engine/cpu_linear.py``.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from glmserve.engine.model import cpu_linear

from glmserve.bench.common.machine import cpu_model_name
from glmserve.bench.common.micro import time_ms, write_points

# glm-small's matmuls: output layer, h_to_4h, 4h_to_h, query_key_value, dense.
DEFAULT_SHAPES = "65024x512,2736x512,512x1368,768x512,512x512"


@dataclass
class LinearPoint:
    dtype: str
    out_features: int
    in_features: int
    rows: int
    f_linear_ms: float
    onednn_ms: float
    onednn_packed_ms: float
    f_linear_gmacs: float
    onednn_packed_gmacs: float
    max_abs_diff: float          # largest |oneDNN - F.linear| over both oneDNN variants


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated OUTxIN weight shapes")
    parser.add_argument("--rows", default="8,64,512", help="comma-separated input row counts")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and inputs (bfloat16: F.linear already runs oneDNN; packing is the difference)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None)


@torch.inference_mode()
def measure(out_features: int, in_features: int, rows: int, iterations: int, dtype: str = "float32") -> LinearPoint:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen).to(getattr(torch, dtype))
    x = torch.randn(rows, in_features, generator=gen).to(weight.dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
    onednn = cpu_linear._onednn_linear
    reference = F.linear(x, weight).float()
    diff = max((onednn(x, weight, None).float() - reference).abs().max().item(),
               (onednn(x, packed, None).float() - reference).abs().max().item())
    f_ms = time_ms(lambda: F.linear(x, weight), iterations)
    plain_ms = time_ms(lambda: onednn(x, weight, None), iterations)
    packed_ms = time_ms(lambda: onednn(x, packed, None), iterations)
    macs = rows * out_features * in_features
    return LinearPoint(dtype, out_features, in_features, rows, round(f_ms, 3), round(plain_ms, 3), round(packed_ms, 3),
                       round(macs / f_ms / 1e6, 1), round(macs / packed_ms / 1e6, 1), diff)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"expected a positive integer, got {text!r}")
    return value


def _shape(text: str) -> tuple[int, int]:
    """'OUTxIN' -> (out_features, in_features)."""
    parts = text.lower().split("x")
    if len(parts) != 2:
        raise ValueError(f"a weight shape is OUTxIN, e.g. 65024x512; got {text!r}")
    return _positive(parts[0]), _positive(parts[1])


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        shapes = [_shape(text) for text in args.shapes.split(",")]
        rows = [_positive(text) for text in args.rows.split(",")]
    except ValueError as error:
        print(f"glmserve-bench cpu-linear: error: {error}", file=sys.stderr)
        return 2
    if not cpu_linear.onednn_linear_supported():
        print("glmserve-bench cpu-linear: error: this torch build has no working oneDNN linear", file=sys.stderr)
        return 2
    if args.dtype == "bfloat16" and not cpu_linear.onednn_bf16_packing_supported():
        print("glmserve-bench cpu-linear: error: oneDNN has no bfloat16 kernels for this CPU", file=sys.stderr)
        return 2
    print(f"cpu-linear: {args.dtype}, {torch.get_num_threads()} threads on {cpu_model_name()}, "
          f"torch {torch.__version__}")
    print(f"{'weight':>12} {'rows':>5} {'F.linear ms':>12} {'oneDNN ms':>10} {'packed ms':>10} "
          f"{'F.linear GMAC/s':>16} {'packed GMAC/s':>14} {'max|diff|':>10}")
    points = []
    for out_features, in_features in shapes:
        for n in rows:
            p = measure(out_features, in_features, n, args.iterations, args.dtype)
            points.append(p)
            print(f"{out_features:>6}x{in_features:<5} {n:>5} {p.f_linear_ms:>12.3f} {p.onednn_ms:>10.3f} "
                  f"{p.onednn_packed_ms:>10.3f} {p.f_linear_gmacs:>16.1f} {p.onednn_packed_gmacs:>14.1f} "
                  f"{p.max_abs_diff:>10.2e}", flush=True)
    if args.out:
        write_points(args.out, points)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="glmserve-bench cpu-linear", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
