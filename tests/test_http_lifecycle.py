"""The HTTP API follows the server's lifecycle exactly as gRPC does: 503 (and /health 503) until the model is
loaded and warmed up, while draining and once the engine is dead; a drain lets in-flight HTTP calls finish; a real
``glmserve serve`` process drains HTTP streams on SIGTERM and exits 0."""
from __future__ import annotations

import asyncio
import signal
import threading

import openai
import pytest

from glmserve.engine.runtime.engine_core import EngineCore

from .server_fixtures import InProcessServer, ServeProcess, eventually, http_json, tiny_engine_config

MODEL = "glm-tiny"


@pytest.fixture
def own_server():
    servers = []

    def start(**kwargs):
        servers.append(InProcessServer(**kwargs))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def health(port: int) -> int:
    return http_json(f"http://127.0.0.1:{port}/health")[0]


def test_503_until_loaded_and_warmed_up(own_server):
    release = threading.Event()

    def slow_engine():
        release.wait(30)
        return EngineCore(tiny_engine_config())

    server = own_server(make_engine=slow_engine, wait_loaded=False)
    port = server.server.http_port
    status, body = http_json(f"http://127.0.0.1:{port}/health")
    assert status == 503 and "starting" in body["error"]["message"]
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as api:
        with pytest.raises(openai.InternalServerError) as info:
            api.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.status_code == 503 and "starting" in info.value.body["message"]
        release.set()
        server.loaded.result(timeout=60)
        assert health(port) == 200
        assert api.completions.create(model=MODEL, prompt="hi", max_tokens=2).choices[0].finish_reason == "length"


def test_drain_finishes_in_flight_http_calls_and_refuses_new_ones(own_server):
    server = own_server()
    port = server.server.http_port
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=60) as api:
        stream = api.completions.create(model=MODEL, prompt="hello", max_tokens=300, temperature=0.0, stream=True,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        chunks = iter(stream)
        first = next(chunks)
        drain = asyncio.run_coroutine_threadsafe(server.server.drain(timeout=30), server.loop)
        eventually(lambda: health(port) == 503, what="/health 503")
        with pytest.raises(openai.InternalServerError) as info:
            api.completions.create(model=MODEL, prompt="late", max_tokens=2)
        assert info.value.status_code == 503 and "shutting down" in info.value.body["message"]
        rest = list(chunks)
        tokens = sum(len(c.choices[0].model_extra["token_ids"]) for c in [first, *rest])
        assert rest[-1].choices[0].finish_reason == "length" and tokens == 300
    assert drain.result(timeout=30) == (1, True)


def test_a_dead_engine_makes_health_503(own_server):
    server = own_server()

    def broken_step():
        raise RuntimeError("device lost")

    server.engine.step = broken_step
    with openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0) as api:
        with pytest.raises(openai.InternalServerError) as info:
            api.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.status_code == 500 and "device lost" in info.value.body["message"]
        eventually(lambda: health(server.server.http_port) == 503, what="/health 503")
        with pytest.raises(openai.InternalServerError) as info:
            api.completions.create(model=MODEL, prompt="hi", max_tokens=2)
        assert info.value.status_code == 503


def test_http_port_in_use_exits_1(capsys):
    import socket

    from glmserve.engine.entrypoints.cli.main import main as cli_main
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["serve", "--model", "glm-tiny", "--host", "127.0.0.1", "--port", "0", "--http-port",
                         str(port), "--metrics-port", "-1"]) == 1
    assert f"cannot listen on 127.0.0.1:{port} (HTTP)" in capsys.readouterr().err


@pytest.mark.subprocess
def test_sigterm_drains_http_streams_and_exits_0():
    proc = ServeProcess("--drain-timeout", "60")
    try:
        assert proc.http_port is not None
        proc.wait_for_line("glmserve: ready")
        assert health(proc.http_port) == 200
        base_url = f"http://127.0.0.1:{proc.http_port}/v1"
        with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60) as api:
            streams = [iter(api.completions.create(model=MODEL, prompt=f"request {i}", max_tokens=400,
                                                   temperature=0.0, stream=True,
                                                   extra_body={"ignore_eos": True, "return_token_ids": True}))
                       for i in range(3)]
            firsts = [next(s) for s in streams]
            results: list = [None] * 3

            def finish(i):
                chunks = [firsts[i], *streams[i]]
                results[i] = (chunks[-1].choices[0].finish_reason,
                              sum(len(c.choices[0].model_extra["token_ids"]) for c in chunks))
            readers = [threading.Thread(target=finish, args=(i,)) for i in range(3)]
            for t in readers:
                t.start()
            proc.proc.send_signal(signal.SIGTERM)
            eventually(lambda: health(proc.http_port) == 503, what="/health 503")
            with pytest.raises(openai.InternalServerError) as info:
                api.completions.create(model=MODEL, prompt="late", max_tokens=2)
            assert info.value.status_code == 503
            for t in readers:
                t.join(60)
        assert results == [("length", 400)] * 3
        assert proc.proc.wait(30) == 0
        assert "glmserve: drained 3 in-flight requests, exiting" in proc.lines
    finally:
        proc.close()
