"""Shared helpers for the server tests: a real gRPC server on loopback, in-process or as a subprocess.

Most tests use an in-process server running on its own event-loop thread (starting a subprocess costs seconds of
imports on a 2-core machine); one server is shared by every module that asks for ``shared_server``. The
SIGTERM/drain and start-up tests start ``glmserve serve --port 0`` as a real process instead.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from glmserve.engine.entrypoints.grpc.client import GenerationClient
from glmserve.engine.config.engine_config import CacheConfig, EngineConfig, SchedulerConfig
from glmserve.engine.runtime.core_client import InprocEngineCore
from glmserve.engine.runtime.engine_core import EngineCore
from glmserve.engine.entrypoints.server_options import ServerOptions
from glmserve.engine.entrypoints.server_thread import ServerThread

MODEL = "glm-tiny"
SEED = 0
# Enough KV blocks for 64 short streams and a few long ones, small enough to allocate quickly.
NUM_KV_BLOCKS = 1024


def tiny_engine_config(**scheduler) -> EngineConfig:
    return EngineConfig(model=MODEL, seed=SEED, attention_backend="torch",
                        cache=CacheConfig(num_kv_blocks=NUM_KV_BLOCKS),
                        scheduler=SchedulerConfig(**{"max_num_seqs": 64, **scheduler}))


class InProcessServer(ServerThread):
    """A server on a background event-loop thread, with the tiny model by default and test conveniences."""

    def __init__(self, options: ServerOptions | None = None, make_engine: Callable[[], EngineCore] | None = None,
                 wait_loaded: bool = True):
        make_engine = make_engine or (lambda: EngineCore(tiny_engine_config()))
        super().__init__(options or ServerOptions(port=0, http_port=0, metrics_port=0),
                         lambda: InprocEngineCore(make_engine()),
                         wait_loaded)

    @property
    def engine(self) -> EngineCore:
        return self.server.async_engine.client.core

    def client(self, **kwargs) -> GenerationClient:
        return GenerationClient(self.target, **kwargs)

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.server.metrics_port}/metrics", timeout=10) as r:
            return r.read().decode()


_shared: InProcessServer | None = None


@pytest.fixture(scope="session")
def session_server() -> InProcessServer:
    """One default server for the whole test session, shared by every module that imports this fixture."""
    global _shared
    if _shared is None:
        _shared = InProcessServer()
    yield _shared
    if _shared is not None:   # the first module's teardown closes it; the others find it gone
        _shared.close()
        _shared = None


@pytest.fixture
def shared_server(session_server) -> InProcessServer:
    yield session_server
    with session_server.client() as c:
        wait_idle(c)   # no test leaves work behind for the next one


@pytest.fixture
def client(shared_server):
    with shared_server.client() as c:
        yield c


def eventually(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``predicate`` until it holds (state that changes on the server's threads, not the test's)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout}s")
        time.sleep(0.01)


def wait_idle(client: GenerationClient, timeout: float = 20.0) -> None:
    """Wait until nothing runs or waits and every KV block is free (as GetLoad reports it)."""
    def idle() -> bool:
        load = client.load()
        return load.num_running == load.num_waiting == 0 and load.num_free_blocks == load.num_total_blocks
    eventually(idle, timeout, "the server going idle")


def http_json(url: str, payload: dict | None = None, headers: dict[str, str] | None = None,
              timeout: float = 30) -> tuple[int, dict]:
    """(status, JSON body) of a GET (no payload) or a POST of ``payload``; an error status is returned, not raised."""
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data, {"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def parse_metrics(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a /metrics page."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


# ---- scripted replies: make the dummy model "say" a chosen token sequence ----------------------------------------
@contextmanager
def scripted_replies(engine: EngineCore, scripts: dict[str, list[int]]):
    """While active, a request whose id is in ``scripts`` (or any request, for the key ``"*"``) samples exactly
    those tokens, in order.

    Dummy weights never write a tool call by themselves; this replaces the sampled ids after the real forward pass
    (so the whole engine path still runs) with the script, position by position.
    """
    runner = engine.runner
    original = runner.execute

    def execute(batch, block_tables):
        result = original(batch, block_tables)
        for i, request in enumerate(batch.requests):
            script = scripts.get(request.request_id, scripts.get("*"))
            if script is not None and result.token_ids[i] is not None:
                result.token_ids[i] = script[min(request.num_output_tokens, len(script) - 1)]
        return result

    runner.execute = execute
    try:
        yield
    finally:
        runner.execute = original


# ---- subprocess server ---------------------------------------------------------------------------------------------
SERVING_LINE = re.compile(r"glmserve: serving on (\S+):(\d+) metrics on (\d+|off) http on (\d+|off)")


class ServeProcess:
    """``glmserve serve --model glm-tiny --port 0 --http-port 0 ...`` as a child process, its stdout read on a
    thread."""

    def __init__(self, *extra_args: str, timeout: float = 120):
        cmd = [sys.executable, "-m", "glmserve.engine.entrypoints.cli.main", "serve", "--model", MODEL, "--host", "127.0.0.1",
               "--port", "0", "--http-port", "0", "--metrics-port", "0", "--num-kv-blocks", str(NUM_KV_BLOCKS),
               "--attention-backend", "torch", *extra_args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._new_line = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        match = SERVING_LINE.search(self.wait_for_line("glmserve: serving on", timeout))
        self.engine_core_line = self.wait_for_line("glmserve: engine core pid", timeout)
        self.engine_core_pid = int(re.search(r"engine core pid (\d+)", self.engine_core_line).group(1))
        self.port = int(match.group(2))
        self.metrics_port = None if match.group(3) == "off" else int(match.group(3))
        self.http_port = None if match.group(4) == "off" else int(match.group(4))
        self.target = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._new_line:
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def wait_for_line(self, prefix: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        with self._new_line:
            while True:
                found = next((line for line in self.lines if line.startswith(prefix)), None)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._new_line.wait(0.2)):
                    raise AssertionError(f"no line starting with {prefix!r}; output so far:\n" + "\n".join(self.lines))
                self._new_line.wait(remaining)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
