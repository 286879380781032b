"""Server lifecycle in-process: NOT_SERVING/UNAVAILABLE while loading, drain, a dead engine; API key, queue limit,
TLS and reflection. Each test that changes the server's state gets a server of its own."""
from __future__ import annotations

import asyncio
import shutil
import subprocess
import threading

import grpc
import pytest
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from glmserve.engine.entrypoints.grpc.client import GenerationClient
from glmserve.engine.runtime.engine_core import EngineCore
from glmserve.engine.entrypoints.server_options import ServerOptions

from .server_fixtures import InProcessServer, session_server, shared_server, tiny_engine_config  # noqa: F401
from .server_fixtures import eventually, wait_idle

SERVICE = "glmserve.v1.Generation"


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


@pytest.fixture
def own_server():
    servers = []

    def start(**kwargs):
        servers.append(InProcessServer(**kwargs))
        return servers[-1]
    yield start
    for server in servers:
        server.close()


def test_not_serving_and_unavailable_until_loaded_and_warmed_up(own_server):
    release = threading.Event()

    def slow_engine():
        release.wait(30)
        return EngineCore(tiny_engine_config())

    server = own_server(make_engine=slow_engine, wait_loaded=False)
    with server.client() as c:
        assert c.health() == "NOT_SERVING"
        assert c.health(SERVICE) == "NOT_SERVING"
        for call in (lambda: list(c.generate("hi", max_tokens=2)), lambda: c.tokenize("hi"), c.load):
            err = rpc_error(call)
            assert err.code() == grpc.StatusCode.UNAVAILABLE and "starting" in err.details()
        release.set()
        server.loaded.result(timeout=60)
        assert c.health() == "SERVING" and c.health(SERVICE) == "SERVING"
        assert list(c.generate("hi", max_tokens=2))[-1].finished


def test_drain_finishes_in_flight_requests_and_refuses_new_ones(own_server):
    server = own_server()
    with server.client() as c:
        stream = c.generate("hello", max_tokens=300, ignore_eos=True, temperature=0.0)
        first = next(stream)
        drain = asyncio.run_coroutine_threadsafe(server.server.drain(timeout=30), server.loop)
        eventually(lambda: c.health() == "NOT_SERVING", what="health NOT_SERVING")
        assert c.health(SERVICE) == "NOT_SERVING"
        err = rpc_error(lambda: list(c.generate("hi", max_tokens=2)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in err.details()
        assert c.load().num_running == 1     # read-only calls still answer during a drain
        rest = list(stream)
        # Every token arrives, though a reader that falls behind gets several per chunk.
        assert rest[-1].finish_reason == "length" and sum(len(chunk.token_ids) for chunk in [first, *rest]) == 300
        assert drain.result(timeout=30) == (1, True)


def test_a_dead_engine_reports_not_serving(own_server):
    server = own_server()

    def broken_step():
        raise RuntimeError("device lost")

    server.engine.step = broken_step   # the step fails, and so does the recovery step: the engine is dead
    with server.client() as c:
        err = rpc_error(lambda: list(c.generate("hi", max_tokens=2)))
        assert err.code() == grpc.StatusCode.INTERNAL and "device lost" in err.details()
        assert server.server.async_engine.is_dead
        eventually(lambda: c.health() == "NOT_SERVING", what="health NOT_SERVING")
        assert c.health(SERVICE) == "NOT_SERVING"
        err = rpc_error(lambda: list(c.generate("hi", max_tokens=2)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE


def test_api_key_and_queue_limit(own_server):
    server = own_server(options=ServerOptions(port=0, metrics_port=0, api_key="sekrit", max_waiting_requests=1),
                        make_engine=lambda: EngineCore(tiny_engine_config(max_num_seqs=1)))
    with server.client() as anonymous, server.client(api_key="wrong") as wrong, \
            server.client(api_key="sekrit") as c:
        assert anonymous.health() == "SERVING"   # health is exempt
        for bad in (anonymous, wrong):
            for call in (lambda: list(bad.generate("hi", max_tokens=2)), bad.load, bad.model_info):
                err = rpc_error(call)
                assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "API key" in err.details()
        with grpc.insecure_channel(server.target) as channel:   # reflection is protected too
            with pytest.raises(grpc.RpcError):
                ProtoReflectionDescriptorDatabase(channel).get_services()

        running = c.generate("one", max_tokens=3000, ignore_eos=True)
        next(running)
        waiting = c.generate("two", max_tokens=2)   # max_num_seqs=1: this one waits
        eventually(lambda: c.load().num_waiting == 1, what="one request waiting")
        err = rpc_error(lambda: list(c.generate("three", max_tokens=2)))
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "waiting queue" in err.details()
        running.close()
        assert list(waiting)[-1].finish_reason == "length"
        wait_idle(c)
    counts = server.metrics_text()
    assert 'glmserve_grpc_requests_total{code="UNAUTHENTICATED",method="Generate"} 2.0' in counts
    assert 'glmserve_grpc_requests_total{code="RESOURCE_EXHAUSTED",method="Generate"} 1.0' in counts


def test_reflection_lists_the_service(shared_server):
    with grpc.insecure_channel(shared_server.target) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert SERVICE in services and "grpc.health.v1.Health" in services


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls(own_server, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    server = own_server(options=ServerOptions(port=0, metrics_port=None, tls_cert=str(cert), tls_key=str(key)))
    with GenerationClient(f"localhost:{server.server.port}", root_certificates=cert.read_bytes()) as c:
        assert list(c.generate("hi", max_tokens=2))[-1].finish_reason == "length"
    with server.client() as plaintext:
        assert rpc_error(lambda: plaintext.health(timeout=5)).code() == grpc.StatusCode.UNAVAILABLE
