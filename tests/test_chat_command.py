"""``glmserve chat`` against a real server: streamed replies, history kept, ``clear`` and ``stop``."""
from __future__ import annotations

import io

from glmserve.engine.entrypoints.cli.main import main as cli_main

from .server_fixtures import scripted_replies, session_server, shared_server  # noqa: F401 (fixtures)


def run_chat(monkeypatch, capsys, server, typed: str, *extra: str) -> tuple[int, str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(typed))
    code = cli_main(["chat", "--target", server.target, "--temperature", "0", "--max-tokens", "8", *extra])
    return code, capsys.readouterr().out


def test_chat_streams_replies_and_keeps_history(monkeypatch, capsys, shared_server):
    tok = shared_server.engine.tokenizer
    seen_prompts = []
    original_add = shared_server.engine.add_request

    def record(request_id, prompt_token_ids, params, **kwargs):
        seen_prompts.append(list(prompt_token_ids))
        return original_add(request_id, prompt_token_ids, params, **kwargs)

    monkeypatch.setattr(shared_server.engine, "add_request", record)
    reply = (tok.encode("\n", add_special_tokens=False) + tok.encode("Hello there.", add_special_tokens=False)
             + [tok.eos_token_id])
    with scripted_replies(shared_server.engine, {"*": reply}):
        code, out = run_chat(monkeypatch, capsys, shared_server, "hi\nhow are you\nclear\nagain\nstop\n",
                             "--system", "Be brief.")
    assert code == 0
    assert "Chatting with glm-tiny" in out
    assert out.count("ChatGLM: Hello there.") == 3
    assert "(history cleared)" in out
    user, assistant = tok.special_token_ids["<|user|>"], tok.special_token_ids["<|assistant|>"]
    system = tok.special_token_ids["<|system|>"]
    first, second, third = seen_prompts
    assert first.count(user) == 1 and first.count(system) == 1
    assert second.count(user) == 2 and second.count(assistant) == 2    # the first turn went back with it
    assert second[:len(first)] == first
    assert third.count(user) == 1                                      # cleared


def test_chat_exits_on_end_of_input(monkeypatch, capsys, shared_server):
    code, out = run_chat(monkeypatch, capsys, shared_server, "hello\n")
    assert code == 0 and out.count("ChatGLM:") == 1


def test_chat_reports_an_unreachable_server(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert cli_main(["chat", "--target", "127.0.0.1:1"]) == 1
    assert "cannot reach 127.0.0.1:1" in capsys.readouterr().err
