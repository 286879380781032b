"""Two engines in one process, stepping at the same time in two threads on different batches: each gets the
tokens its requests get alone. The pass's attention metadata goes down with each forward call (ForwardBatch) and
each model holds its own backend, caches and ops, so nothing is shared between the engines."""
from __future__ import annotations

import threading

from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.kernels.cpu.availability import native_cpu_available

from .engine_helpers import assert_no_leaks, collect, make_engine, random_prompts, run_to_completion

PARAMS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _engine():
    # A small token budget: long prompts are chunked beside the other requests' decodes.
    return make_engine("glm-tiny", max_num_batched_tokens=40, num_kv_blocks=128)


def test_two_engines_stepping_at_once_in_two_threads_each_get_their_solo_result():
    batches = [[(f"a{i}", p) for i, p in enumerate(random_prompts(4, 2000, (3, 30), seed=31))],
               [(f"b{i}", p) for i, p in enumerate(random_prompts(5, 2000, (20, 90), seed=32))]]
    solo = _engine()
    expected = [{rid: run_to_completion(solo, {0: [(rid, prompt, PARAMS)]})[rid] for rid, prompt in batch}
                for batch in batches]

    engines = [_engine(), _engine()]
    # The cpu backend (native kernels, whose ctypes calls release the GIL) where it builds.
    assert {e.runner.backend.name for e in engines} == {"cpu" if native_cpu_available() else "torch"}
    for engine, batch in zip(engines, batches):
        for rid, prompt in batch:
            engine.add_request(rid, prompt, PARAMS)
    # Both threads enter every step together; the barrier's action decides, while neither is stepping, whether
    # there is another round.
    state = {"rounds": 0, "overlapping": 0, "stop": False}

    def next_round() -> None:
        busy = [e.has_unfinished_requests() for e in engines]
        state["stop"] = not any(busy)
        state["rounds"] += 1
        state["overlapping"] += all(busy)
    barrier = threading.Barrier(2, action=next_round, timeout=120)
    outputs: list[dict] = [{}, {}]
    errors: list[BaseException] = []

    def drive(i: int) -> None:
        try:
            while True:
                barrier.wait()
                if state["stop"]:
                    return
                if engines[i].has_unfinished_requests():
                    for rid, tokens in collect(engines[i].step()).items():
                        outputs[i].setdefault(rid, []).extend(tokens)
        except BaseException as exc:   # noqa: BLE001 - reported by the main thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    assert state["overlapping"] >= 5           # many steps ran at the same time, mixing prefill chunks and decodes
    assert outputs == expected
    for engine in engines:
        assert_no_leaks(engine)
