"""Tensor parallel with real worker processes (gloo on CPU), on glm-tiny (4 heads, 2 KV groups: N = 4 replicates
the KV groups): TP=2 and TP=4 give TP=1's greedy tokens offline and through ``glmserve serve``; each rank holds
1/N of the weights plus the replicated parts; a dead worker fails the engine (AsyncEngine dead, health
NOT_SERVING) instead of hanging; the workers exit with the server, also when it is killed."""
from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import grpc
import pytest
import torch

from glmserve.engine.core.errors import EngineStepError
from glmserve.engine.runtime.async_engine import AsyncEngine
from glmserve.engine.runtime.core_client import InprocEngineCore
from glmserve.engine.model.checkpoint_writer import write_checkpoint
from glmserve.engine.entrypoints.grpc.client import GenerationClient, collect
from glmserve.engine.config.model_config import MODEL_PRESETS
from glmserve.engine.core.errors import EngineDeadError
from glmserve.engine.entrypoints.llm import LLM
from glmserve.engine.model.glm import GLMForCausalLM
from glmserve.engine.model.shard_layout import ShardLayout
from glmserve.engine.distributed.protocol import WorkerReady
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.distributed.tp_executor import TensorParallelError, TensorParallelExecutor
from glmserve.engine.runtime.engine_core import EngineCore
from glmserve.engine.text.tokenizer import embedded_tokenizer_path

from .engine_helpers import random_prompts
from .server_fixtures import MODEL, NUM_KV_BLOCKS, SEED, ServeProcess, eventually

pytestmark = pytest.mark.tensor_parallel

TINY = MODEL_PRESETS["glm-tiny"]
# A small step budget splits the longer prompts into chunks: chunked prefill and decodes share steps.
ENGINE_ARGS = dict(num_kv_blocks=256, max_num_batched_tokens=64, attention_backend="torch")
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PROMPTS = random_prompts(6, 2000, (1, 150), seed=3)


@pytest.fixture(scope="module")
def bin_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("glm-tiny-bin"), TINY, embedded_tokenizer_path(), fmt="bin",
                            shards=3, dtype=torch.float32, seed=0)


def _greedy(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=GREEDY)]


def _layout_parameter_bytes(rank: int, n: int) -> int:
    """What the layout says rank ``rank`` holds (a model on the meta device; fp32)."""
    with torch.device("meta"):
        model = GLMForCausalLM(TINY, ShardLayout(TINY, rank, n), group=object())
    return sum(p.numel() * 4 for p in model.parameters())


def _worker_pids(parent: int) -> list[int]:
    """The spawned worker processes of ``parent`` that are still running."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == parent and state != "Z" and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return pids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _check_rank_memory(engine: EngineCore, n: int) -> None:
    memory = engine.executor.rank_memory(engine.runner)
    total = TINY.num_parameters() * 4
    assert [m.rank for m in memory] == list(range(n))
    for m in memory:
        assert m.parameter_bytes == _layout_parameter_bytes(m.rank, n)   # the worker holds just its shard
        assert m.parameter_bytes <= total * 1.03 / n
        # K and V of each layer for the rank's one KV group (of glm-tiny's two), fp32
        assert m.kv_cache_bytes == ENGINE_ARGS["num_kv_blocks"] * 16 * TINY.num_layers * 2 * TINY.head_dim * 4


class TestTwoRanks:
    """One TP=2 engine (one process group per process: it is shut down before the TP=4 test starts)."""

    @pytest.fixture(scope="class")
    def tp2(self, tiny_checkpoint):
        """A TP=2 engine on the safetensors checkpoint; the class's last test kills one of its workers."""
        llm = LLM(str(tiny_checkpoint), tensor_parallel_size=2, **ENGINE_ARGS)
        yield llm
        llm.engine.shutdown()

    def test_tp2_gives_tp1_greedy_tokens_and_each_rank_holds_half(self, tiny_checkpoint, tp2):
        assert isinstance(tp2.engine.executor, TensorParallelExecutor)
        assert _greedy(tp2) == _greedy(LLM(str(tiny_checkpoint), **ENGINE_ARGS))
        _check_rank_memory(tp2.engine, 2)

    def test_a_worker_dying_mid_generation_fails_the_engine_instead_of_hanging(self, tp2):
        engine = tp2.engine
        async_engine = AsyncEngine(InprocEngineCore(engine))

        async def generate_and_kill():
            stream = await async_engine.generate("long", [5, 6, 7], SamplingParams(max_tokens=3000, ignore_eos=True))
            await stream.__anext__()
            os.kill(engine.executor.pool.worker_pids[0], signal.SIGKILL)
            with pytest.raises(EngineStepError, match=r"tensor-parallel rank 1 \(pid \d+\) died"):
                async for _ in stream:
                    pass
            with pytest.raises(EngineDeadError):
                await async_engine.generate("after", [5], SamplingParams(max_tokens=2))

        try:
            asyncio.run(asyncio.wait_for(generate_and_kill(), timeout=30))
            assert async_engine.is_dead
        finally:
            asyncio.run(async_engine.shutdown())


def test_tp4_replicates_the_kv_groups_and_gives_tp1_greedy_tokens(bin_checkpoint):
    expected = _greedy(LLM(str(bin_checkpoint), **ENGINE_ARGS))
    llm = LLM(str(bin_checkpoint), tensor_parallel_size=4, **ENGINE_ARGS)
    try:
        assert _greedy(llm) == expected
        _check_rank_memory(llm.engine, 4)
        # A worker's own error reaches rank 0 with its traceback, and the engine stays failed.
        pool = llm.engine.executor.pool
        pool.send("not a command")
        with pytest.raises(TensorParallelError, match=r"rank [123] failed:\n(.|\n)*unknown command 'not a command'"):
            pool.expect(WorkerReady)
        with pytest.raises(TensorParallelError, match="rank [123] failed"):
            llm.engine.step()
    finally:
        llm.engine.shutdown()
    assert not any(_alive(pid) for pid in pool.worker_pids)


# ---- through the gRPC server ---------------------------------------------------------------------------------------
PROMPT = "The kettle clicked off just as the first train"


def test_serve_tp2_gives_tp1_tokens_and_its_workers_exit_with_it():
    prompts = [PROMPT, "A much longer prompt about trains and kettles " * 6, "hi"]
    offline = LLM(MODEL, seed=SEED, num_kv_blocks=NUM_KV_BLOCKS, attention_backend="torch")
    expected = [o.outputs[0].token_ids for o in offline.generate(prompts, SamplingParams(max_tokens=10,
                                                                                           temperature=0.0))]
    server = ServeProcess("--tensor-parallel-size", "2", "--seed", str(SEED))
    try:
        server.wait_for_line("glmserve: ready")
        workers = _worker_pids(server.engine_core_pid)
        assert len(workers) == 1
        with GenerationClient(server.target) as client:
            for prompt, want in zip(prompts, expected):
                (sample,) = collect(client.generate(prompt, max_tokens=10, temperature=0.0, stream=True))
                assert sample.token_ids == want
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        eventually(lambda: not any(_alive(p) for p in workers), timeout=10, what="the worker exits")
    finally:
        server.close()


def test_serve_reports_not_serving_when_a_worker_dies_and_a_killed_server_takes_its_workers_along():
    server = ServeProcess("--tensor-parallel-size", "4")
    try:
        server.wait_for_line("glmserve: ready")
        workers = _worker_pids(server.engine_core_pid)
        assert len(workers) == 3
        with GenerationClient(server.target) as client:
            assert client.health() == "SERVING"
            os.kill(workers[0], signal.SIGKILL)
            eventually(lambda: any("rank 1" in line and "died" in line for line in server.lines),
                       what="the watchdog's log line")
            with pytest.raises(grpc.RpcError):
                collect(client.generate(PROMPT, max_tokens=4, temperature=0.0))
            eventually(lambda: client.health() == "NOT_SERVING", what="health NOT_SERVING")
        # The failed step never reached ranks 2 and 3 (the watchdog had already failed the engine): they are idle.
        assert all(_alive(p) for p in workers[1:])
        server.proc.kill()      # no atexit, no shutdown: the engine core sees its pipe close, then the workers theirs
        server.proc.wait(10)
        eventually(lambda: not any(_alive(p) for p in workers[1:]), timeout=10, what="the workers exit")
    finally:
        server.close()
