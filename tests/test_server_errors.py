"""Status codes: bad input, duplicates, deadlines, cancellation, engine faults, and that blocks are always freed."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import grpc
import pytest

from glmserve.proto import generation_pb2 as pb
from glmserve.proto import generation_pb2_grpc as pb_grpc
from glmserve.engine.entrypoints.grpc.client import collect

from .server_fixtures import client, parse_metrics, session_server, shared_server, wait_idle  # noqa: F401

LONG = dict(max_tokens=3000, ignore_eos=True, temperature=0.0)   # runs for seconds on the tiny model


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.mark.parametrize("sampling, field_name", [
    ({"temperature": -1.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),   # past max_model_len
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
    ({"logprobs": 50}, "logprobs"),
    ({"n": 0}, "n"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [10 ** 6]}, "stop_token_ids"),
])
def test_bad_sampling_values(client, sampling, field_name):
    err = rpc_error(lambda: list(client.generate("hello", **sampling)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_name in err.details()


@pytest.mark.parametrize("kwargs, field_name", [
    ({"prompt": ""}, "prompt"),
    ({"prompt_token_ids": []}, "prompt"),
    ({"prompt_token_ids": [5] * 4096}, "prompt"),   # no room left to generate within max_model_len
    ({"prompt_token_ids": [5, 10 ** 6]}, "prompt_token_ids"),
    ({"prompt_token_ids": [5, -1]}, "prompt_token_ids"),
    ({"prompt": "x", "request_id": "r" * 257}, "request_id"),
])
def test_bad_prompts(client, kwargs, field_name):
    err = rpc_error(lambda: list(client.generate(**kwargs)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_name in err.details()


def test_request_ids_may_contain_any_character(client):
    """Samples of an n > 1 request are tracked by their request's id and index: a request named like another's
    sample ("a#1") runs beside it without a clash."""
    first = client.generate("x", request_id="a", n=2, max_tokens=40, min_tokens=40, temperature=1.0, seed=1)
    assert next(first).token_ids                   # "a" and its two samples are in flight
    second = collect(client.generate("y", request_id="a#1", n=2, max_tokens=3, min_tokens=3, temperature=0.0))
    assert [len(s.token_ids) for s in second] == [3, 3]
    rest = collect(first)
    assert sorted(s.index for s in rest) == [0, 1] and all(s.finish_reason == "length" for s in rest)


def test_missing_input(shared_server):
    with grpc.insecure_channel(shared_server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        err = rpc_error(lambda: list(stub.Generate(pb.GenerateRequest())))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in err.details()
        err = rpc_error(lambda: stub.Tokenize(pb.TokenizeRequest()))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "input" in err.details()


@pytest.mark.parametrize("messages, tools, field_name", [
    ([], None, "messages"),
    ([{"role": "robot", "content": "beep"}], None, "messages[0]"),
    ([{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}], None, "messages[1]"),
    ([{"role": "user", "content": "hi"}], "{not json", "tools"),
    ([{"role": "user", "content": "hi"}], "42", "tools"),
])
def test_bad_chats(client, messages, tools, field_name):
    err = rpc_error(lambda: list(client.chat(messages, tools=tools, max_tokens=2)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_name in err.details()
    err = rpc_error(lambda: client.tokenize(messages=messages, tools=tools))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_duplicate_in_flight_request_id(client):
    first = client.generate("hello", request_id="dup", **LONG)
    next(first)
    err = rpc_error(lambda: list(client.generate("hello", request_id="dup", max_tokens=2)))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "dup" in err.details()
    first.close()
    wait_idle(client)
    # Once the first is gone the id is free again.
    assert list(client.generate("hello", request_id="dup", max_tokens=2))[-1].finish_reason == "length"


@contextmanager
def engine_held_after_one_step(engine):
    """While active, the engine's first model step runs; the next one waits until ``release`` is set (or a hang guard
    of 60 s passes). A request admitted by that first step has its first token and its KV blocks, and keeps both."""
    runner, original = engine.runner, engine.runner.execute
    stepped, release = threading.Event(), threading.Event()

    def execute_once_then_hold(*args, **kwargs):
        if stepped.is_set():
            release.wait(60)
        try:
            return original(*args, **kwargs)
        finally:
            stepped.set()

    runner.execute = execute_once_then_hold
    try:
        yield release
    finally:
        release.set()
        runner.execute = original


def abort_count(server) -> float:
    return parse_metrics(server.metrics_text()).get(
        ("glmserve_request_success_total", (("finish_reason", "abort"),)), 0.0)


def test_deadline_aborts_and_frees_blocks(client, shared_server):
    # The deadline must pass while the request runs with its KV blocks. Rather than race a short deadline against
    # the first token on a busy machine, the engine is held after the step that produced the first token: the
    # request cannot finish, so the deadline passes while it runs, whatever the machine's speed. Only the first
    # token must beat the deadline; a machine too stalled for that gets a longer one.
    aborts_before = abort_count(shared_server)
    for deadline_s in (1.0, 4.0, 16.0):
        with engine_held_after_one_step(shared_server.engine) as release:
            stream = client.generate("hello", timeout=deadline_s, **LONG)
            try:
                first = next(stream)
            except grpc.RpcError as err:    # the deadline passed before the first token: retry with a longer one
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                release.set()
                wait_idle(client)
                aborts_before = abort_count(shared_server)
                continue
            assert first.token_ids
            load = client.load()           # GetLoad reads the counters without waiting for a step
            assert load.num_running == 1 and load.num_free_blocks < load.num_total_blocks
            err = rpc_error(lambda: list(stream))
            assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_idle(client)                  # the engine steps on: the request is aborted and its blocks freed
        assert abort_count(shared_server) == aborts_before + 1
        return
    pytest.fail("no first token within 16 s on the tiny model")


def test_deadline_passed_before_start(shared_server):
    # A deadline that is already over by the time the handler runs is refused without queueing anything.
    with grpc.insecure_channel(shared_server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        err = rpc_error(lambda: list(stub.Generate(pb.GenerateRequest(prompt="hi"), timeout=0.0001)))
        assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_client_cancel_frees_blocks_at_once(client):
    stream = client.generate("hello", **LONG)
    for _ in range(3):
        next(stream)
    load = client.load()
    assert load.num_running == 1 and load.num_free_blocks < load.num_total_blocks
    stream.close()   # cancels the call
    wait_idle(client, timeout=2)


def test_engine_fault_fails_the_request_and_the_server_keeps_serving(client, shared_server):
    runner = shared_server.engine.runner
    original = runner.execute
    calls = []

    def fail_once(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    runner.execute = fail_once
    try:
        err = rpc_error(lambda: list(client.generate("hello", max_tokens=4)))
    finally:
        runner.execute = original
    assert err.code() == grpc.StatusCode.INTERNAL and "injected fault" in err.details()
    wait_idle(client)
    assert client.health() == "SERVING"
    assert list(client.generate("hello", max_tokens=4))[-1].finish_reason == "length"
