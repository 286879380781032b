"""bench/kernels/decode_bandwidth_model.py: its predictions (bench/RESULTS.md) rest on the engine's real split choice
and on the review's description of the code before it; check both, and the model's arithmetic."""
from __future__ import annotations

import pytest

from glmserve.bench.kernels.decode_bandwidth_model import (ATTAINABLE, DECODE_SM90, MERGE_SM90, PEAK_BYTES_S,
                                                           REVIEWED_CODE, REVIEWED_DECODE, THIS_CODE, markdown,
                                                           predict, predictions)
from glmserve.kernels.triton.split_kv import active_splits, choose_num_splits

BATCHES = (1, 2, 7, 16, 64, 256)
CONTEXTS = (1, 100, 1024, 5000, 8192, 32768)


def test_the_model_splits_as_the_engine_does():
    for batch in BATCHES:
        for context in CONTEXTS:
            splits = THIS_CODE.splits(batch, context)
            assert splits == choose_num_splits(batch, 2, context, sms=132)
            assert THIS_CODE.active(context, splits)[0] == active_splits(context, splits)


def test_the_reviewed_code_is_the_one_the_review_describes():
    # "batch 1 always uses 32 splits on the 8K model and 128 on the 32K model" (CUDA graphs), 2 programs per SM
    # and at least 256 tokens a split, one K/V buffer.
    assert REVIEWED_CODE.splits(1, 8192) == 32 and REVIEWED_CODE.splits(1, 32768) == 128
    assert REVIEWED_CODE.splits(1, 1024) == 4
    assert REVIEWED_DECODE.load_buffers == 1


def test_occupancy_and_bandwidth_bounds():
    assert DECODE_SM90.resident_per_sm() == 3      # 70.5 KB of shared memory and 74 registers x 256 threads
    assert MERGE_SM90.resident_per_sm() == 8
    for batch in BATCHES:
        for context in CONTEXTS:
            p = predict(THIS_CODE, DECODE_SM90, MERGE_SM90, batch, context)
            assert p.kv_mb == pytest.approx(2 * batch * context * 2 * 128 * 2 / 2**20, abs=0.01)
            assert p.tb_s * 1e12 <= ATTAINABLE * PEAK_BYTES_S
            assert (p.merge_us == 0) == (p.splits == 1)
    big = predict(THIS_CODE, DECODE_SM90, MERGE_SM90, 64, 32768)
    assert big.peak_pct > 80                        # enough bytes in flight: bandwidth-bound


def test_the_graph_path_costs_no_more_than_its_context_needs():
    # A CUDA-graph step sized for the 32K model: a 1K sequence holds 8 splits, as an eager step would give it.
    eager = predict(THIS_CODE, DECODE_SM90, MERGE_SM90, 1, 1024)
    graph = predict(THIS_CODE, DECODE_SM90, MERGE_SM90, 1, 1024, graph_model_len=32768)
    assert (graph.active_splits, graph.partials_mb, graph.total_us) == (eager.active_splits, eager.partials_mb,
                                                                         eager.total_us)
    old = predict(REVIEWED_CODE, REVIEWED_DECODE, MERGE_SM90, 1, 1024, graph_model_len=32768)
    assert old.partials_mb > 4 * graph.partials_mb       # every one of its 128 splits wrote and was merged


def test_the_table_has_a_row_per_case():
    rows = predictions(DECODE_SM90, MERGE_SM90)
    assert len(markdown(rows).splitlines()) == 2 + len(rows)
