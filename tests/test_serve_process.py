"""``glmserve serve`` as a real process: start-up lines and health, SIGTERM drains in-flight requests and exits 0,
a drain that times out still exits 0; bad flags exit 2 with one line."""
from __future__ import annotations

import os
import signal
import socket
import threading
import urllib.request

import grpc
import pytest

from glmserve.engine.entrypoints.cli.main import main as cli_main
from glmserve.engine.entrypoints.grpc.client import GenerationClient, collect

from .server_fixtures import ServeProcess, eventually, parse_metrics

pytestmark = pytest.mark.subprocess

SERVICE = "glmserve.v1.Generation"


@pytest.fixture
def serve_process():
    processes = []

    def start(*args):
        processes.append(ServeProcess(*args))
        return processes[-1]
    yield start
    for p in processes:
        p.close()


def test_sigterm_drains_in_flight_requests_and_exits_0(serve_process):
    proc = serve_process("--drain-timeout", "60")
    with GenerationClient(proc.target) as c:
        seen = c.health()
        assert seen in ("NOT_SERVING", "SERVING")   # health answers from the moment the port is bound
        proc.wait_for_line("glmserve: ready")
        assert c.health() == "SERVING" and c.health(SERVICE) == "SERVING"
        with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=10) as r:
            assert ("glmserve_num_requests_waiting", ()) in parse_metrics(r.read().decode())

        streams = [c.generate(f"request {i}", max_tokens=400, ignore_eos=True, temperature=0.0) for i in range(3)]
        firsts = [next(s) for s in streams]
        results: list = [None] * 3

        def finish(i):
            results[i] = collect([firsts[i], *streams[i]])[0]
        readers = [threading.Thread(target=finish, args=(i,)) for i in range(3)]
        for t in readers:
            t.start()
        proc.proc.send_signal(signal.SIGTERM)
        eventually(lambda: c.health() == "NOT_SERVING", what="health NOT_SERVING")
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate("late", max_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        for t in readers:
            t.join(60)
    assert [(r.finish_reason, len(r.token_ids)) for r in results] == [("length", 400)] * 3
    assert proc.proc.wait(30) == 0
    assert "glmserve: drained 3 in-flight requests, exiting" in proc.lines


def test_serve_binds_the_engine_core_and_the_frontend_to_their_own_cores(serve_process, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("one core: nothing to split between the engine core and the frontend")
    proc = serve_process("--frontend-cpus", "1")
    try:
        proc.wait_for_line("glmserve: ready")        # the engine core binds itself first thing, before it loads
        engine = os.sched_getaffinity(proc.engine_core_pid)
        frontend = {cpu for tid in os.listdir(f"/proc/{proc.proc.pid}/task")
                    for cpu in os.sched_getaffinity(int(tid))}      # every thread of the frontend process
        assert engine == set(cores[:-1]) and frontend == {cores[-1]}
        assert proc.engine_core_line.endswith(f"on CPUs {','.join(map(str, cores[:-1]))}, the frontend on CPUs "
                                              f"{cores[-1]}")
    finally:
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0
    proc = serve_process("--frontend-cpus", "0")                   # 0: no binding, the engine takes every core
    try:
        proc.wait_for_line("glmserve: ready")
        assert os.sched_getaffinity(proc.engine_core_pid) == set(cores)
        assert proc.engine_core_line.split()[-1] == str(proc.engine_core_pid)
    finally:
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.proc.wait(30) == 0


def test_drain_timeout_cancels_what_is_left_and_exits_0(serve_process):
    proc = serve_process("--drain-timeout", "0.3", "--metrics-port", "-1")
    assert proc.metrics_port is None
    with GenerationClient(proc.target) as c:
        c.wait_ready(timeout=60)
        stream = c.generate("forever", max_tokens=3000, ignore_eos=True)
        next(stream)
        proc.proc.send_signal(signal.SIGTERM)
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert proc.proc.wait(30) == 0
    assert any(line.startswith("glmserve: drain timed out") for line in proc.lines)


@pytest.mark.parametrize("args, message", [
    (["--model", "/nonexistent/model"], "neither a checkpoint directory nor a preset"),
    (["--model", "glm-tiny", "--tls-cert", "/nonexistent.pem", "--tls-key", "/nonexistent.key"], "TLS file"),
    (["--model", "glm-tiny", "--drain-timeout", "-1"], "--drain-timeout"),
])
def test_bad_flags_exit_2_with_one_line(capsys, args, message):
    assert cli_main(["serve", "--port", "0", "--metrics-port", "-1", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_port_in_use_exits_1(capsys):
    cores = os.sched_getaffinity(0)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli_main(["serve", "--model", "glm-tiny", "--host", "127.0.0.1", "--port", str(port),
                         "--metrics-port", "-1"]) == 1
    assert "cannot listen on" in capsys.readouterr().err
    assert os.sched_getaffinity(0) == cores    # serve binds the calling process to the frontend's cores, then back


def test_a_dead_engine_core_is_visible_not_hidden_behind_a_healthy_endpoint(serve_process):
    """The engine core runs in its own process: killing it in the middle of a stream ends the stream with
    UNAVAILABLE (no hang), turns health (the liveness probe's "") NOT_SERVING, and refuses new requests."""
    proc = serve_process()
    proc.wait_for_line("glmserve: ready")
    with GenerationClient(proc.target) as c:
        assert c.health() == "SERVING"
        stream = c.generate("a long one", max_tokens=3000, ignore_eos=True, temperature=0.0)
        assert next(stream).token_ids
        os.kill(proc.engine_core_pid, signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as err:
            for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "engine core process" in err.value.details()
        eventually(lambda: c.health() == "NOT_SERVING" and c.health(SERVICE) == "NOT_SERVING",
                   what="health NOT_SERVING")
        with pytest.raises(grpc.RpcError) as err:
            list(c.generate("after", max_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert proc.proc.poll() is None     # the frontend stays up, answering health, until it is restarted


def test_host_defaults_to_loopback_as_server_options_define_it(monkeypatch, capsys):
    """One default for the listen address: ServerOptions' 127.0.0.1, which `serve` takes when --host is absent and
    states in --help (the image and the Kubernetes manifests pass --host 0.0.0.0 themselves)."""
    from glmserve.engine.entrypoints.cli import serve as serve_command
    from glmserve.engine.entrypoints.server_options import ServerOptions
    started = []

    async def record(config, options):
        started.append(options)
        return 0

    monkeypatch.setattr(serve_command, "serve", record)
    assert cli_main(["serve", "--model", "glm-tiny", "--port", "0", "--metrics-port", "-1"]) == 0
    assert cli_main(["serve", "--model", "glm-tiny", "--host", "0.0.0.0", "--port", "0", "--metrics-port", "-1"]) == 0
    assert [o.host for o in started] == [ServerOptions().host, "0.0.0.0"] and ServerOptions().host == "127.0.0.1"
    with pytest.raises(SystemExit):
        cli_main(["serve", "--help"])
    assert f"default: {ServerOptions().host}" in " ".join(capsys.readouterr().out.split())
