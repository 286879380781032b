"""End to end: greedy generation with the Triton backend equals the torch backend, through the real engine
and runner (Triton interpreter on the CPU, compiled on a GPU)."""
from __future__ import annotations

import torch

from glmserve.engine.core.sampling_params import SamplingParams

from ..engine_helpers import assert_no_leaks, make_engine, random_prompts, run_to_completion

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_backend_generates_what_the_torch_backend_generates(tiny_checkpoint):
    prompts = random_prompts(3, 2000, (5, 40), seed=21)
    # A small token budget forces a chunked prefill beside running decodes, so both kernels see mixed batches.
    arrivals = {0: [(f"p{i}", p, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
                    for i, p in enumerate(prompts[:2])],
                1: [("p2", prompts[2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))]}
    results = {}
    for backend in ("torch", "triton"):
        engine = make_engine(str(tiny_checkpoint), attention_backend=backend, max_num_batched_tokens=24,
                             device=DEVICE, dtype="float32")
        results[backend] = run_to_completion(engine, arrivals)
        assert_no_leaks(engine)
    assert results["triton"] == results["torch"]
