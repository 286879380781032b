"""``python -m glmserve.bench.demo``: a miniature run of the whole demo, and its errors when the server fails."""
from __future__ import annotations

import json
import re
import socket
import sys

import pytest

from glmserve.bench import demo
from glmserve.bench.demo import ServerDied, ServerProcess

pytestmark = pytest.mark.subprocess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_server(script: str) -> ServerProcess:
    return ServerProcess([sys.executable, "-c", script])


def test_a_server_that_dies_is_reported_with_its_last_log_lines():
    server = fake_server("print('loading weights'); print('error: no such checkpoint'); raise SystemExit(3)")
    with pytest.raises(ServerDied, match=r"(?s)exited with code 3.*\| error: no such checkpoint"):
        server.wait_for_line(demo.SERVING_LINE, timeout=30)


def test_a_silent_server_times_out():
    server = fake_server("import time; print('still loading', flush=True); time.sleep(60)")
    try:
        # Wait for the child's line first (an event: 30 s only guards against a hang), so that the short timeout
        # below races nothing: the child is sure to have printed, and sure never to print the serving line.
        server.wait_for_line(re.compile("still loading"), timeout=30)
        with pytest.raises(ServerDied, match=r"(?s)no .* line within 0.3s.*\| still loading"):
            server.wait_for_line(demo.SERVING_LINE, timeout=0.3)
    finally:
        server.kill()


def test_a_server_that_never_serves_times_out_on_health():
    port = free_port()
    server = fake_server(f"import time; print('glmserve: serving on 127.0.0.1:{port} metrics on 1', flush=True); "
                         "time.sleep(60)")
    try:
        match = server.wait_for_line(demo.SERVING_LINE, timeout=30)
        with pytest.raises(ServerDied, match="was not SERVING within"):
            server.wait_serving(f"127.0.0.1:{match.group(1)}", timeout=0.5)
    finally:
        server.kill()


def test_miniature_demo_runs_drains_and_exits_zero(tmp_path, capsys):
    out = tmp_path / "results" / "demo.json"   # a folder that does not exist yet: the benchmark makes it
    assert demo.main(["--num-prompts", "16", "--rate", "16", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for title in ("random @ 16 req/s", "random @ 16 req/s (openai)", "multiturn @ 32 req/s", "random @ 32 req/s",
                  "Chaos: 2 requests"):
        assert title in printed
    assert re.search(r"server exited with code 0: glmserve: drained \d+ in-flight requests, exiting", printed)
    assert printed.count(f"length, {demo.DRAIN_TOKENS} tokens") == demo.DRAIN_STREAMS
    assert "(http): length" in printed and "(grpc): length" in printed
    runs = json.loads(out.read_text())
    assert [(r["backend"], r["dataset"], r["completed"]) for r in runs] == [
        ("grpc", "random", 16), ("openai", "random", 8), ("grpc", "multiturn", 8), ("grpc", "random", 6)]
