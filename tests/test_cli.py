"""The glmserve CLI: make-test-model, generate, tokenize; bad flags and paths exit 2 with one line."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from glmserve.engine.entrypoints.cli.main import main


def _run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:   # argparse's own usage errors
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_make_test_model_then_generate_json(tmp_path, capsys):
    ckpt = tmp_path / "m"
    code, out, _ = _run_cli(capsys, "make-test-model", str(ckpt), "--preset", "glm-tiny", "--format", "bin",
                            "--shards", "2", "--dtype", "float32")
    assert code == 0 and "wrote" in out
    assert (ckpt / "pytorch_model.bin.index.json").exists() and (ckpt / "tokenizer.model").exists()
    code, out, _ = _run_cli(capsys, "generate", "--model", str(ckpt), "--prompt", "hello", "--max-tokens", "5",
                            "--ignore-eos", "--json")
    assert code == 0
    result = json.loads(out)
    assert len(result["token_ids"]) == 5 and result["finish_reason"] == "length" and isinstance(result["text"], str)
    # the same request with explicit token ids gives the same tokens
    code, out, _ = _run_cli(capsys, "tokenize", "--model", str(ckpt), "--text", "hello", "--json")
    ids = json.loads(out)["token_ids"]
    code, out, _ = _run_cli(capsys, "generate", "--model", str(ckpt), "--prompt-token-ids", ",".join(map(str, ids)),
                            "--max-tokens", "5", "--ignore-eos", "--json")
    assert json.loads(out)["token_ids"] == result["token_ids"]


def test_generate_chat_file_on_a_preset(tmp_path, capsys):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]))
    code, out, _ = _run_cli(capsys, "generate", "--model", "glm-tiny", "--chat", str(chat), "--max-tokens", "4",
                            "--json")
    assert code == 0 and json.loads(out)["finish_reason"] in ("stop", "length")
    code, out, _ = _run_cli(capsys, "tokenize", "--model", "glm-tiny", "--chat", str(chat))
    ids = [int(t) for t in out.split()]
    from glmserve.engine.text.chat_format import build_chat_prompt, messages_from_json
    from glmserve.engine.text.tokenizer import ChatGLMTokenizer, embedded_tokenizer_path
    tok = ChatGLMTokenizer.from_file(embedded_tokenizer_path())
    assert ids == build_chat_prompt(tok, messages_from_json(json.loads(chat.read_text())))


@pytest.mark.parametrize("argv, message", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "neither a checkpoint directory nor a preset"),
    (["generate", "--model", "glm-tiny", "--prompt-token-ids", "1,x,3"], "comma-separated integers"),
    (["generate", "--model", "glm-tiny", "--prompt-token-ids", "1,999999"], "outside the vocabulary"),
    (["generate", "--model", "glm-tiny", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "--model", "glm-tiny", "--prompt", "x", "--max-tokens", "0"], "max_tokens"),
    (["generate", "--model", "glm-tiny", "--chat", "/no/such/chat.json"], "cannot read chat file"),
    (["generate", "--model", "glm-tiny", "--prompt", "x", "--block-size", "3"], "block_size must be a power of two"),
    (["tokenize", "--model", "glm-tiny", "--tokenizer", "/no/tok.model", "--text", "x"], "/no/tok.model"),
    (["make-test-model", "/tmp/x", "--shards", "0"], "--shards must be >= 1"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, message):
    code, _, err = _run_cli(capsys, *argv)
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_bad_chat_file_content(tmp_path, capsys):
    chat = tmp_path / "chat.json"
    chat.write_text(json.dumps([{"role": "wizard", "content": "hi"}]))
    code, _, err = _run_cli(capsys, "generate", "--model", "glm-tiny", "--chat", str(chat))
    assert code == 2 and "wizard" in err
    chat.write_text("{broken")
    code, _, err = _run_cli(capsys, "generate", "--model", "glm-tiny", "--chat", str(chat))
    assert code == 2 and "not valid JSON" in err


def test_unknown_flag_through_the_console_script():
    proc = subprocess.run([sys.executable, "-m", "glmserve.engine.entrypoints.cli.main", "generate", "--bogus"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "unrecognized arguments" in proc.stderr or "required" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cpu_backend_without_its_native_kernels_is_one_line_and_exit_2(capsys, monkeypatch):
    from glmserve.kernels.cpu import native as cpu_native
    monkeypatch.setenv(cpu_native.ENV_SWITCH, "0")       # read when the engine builds its backend
    code, _, err = _run_cli(capsys, "generate", "--model", "glm-tiny", "--prompt", "x", "--attention-backend", "cpu")
    assert code == 2 and "attention_backend 'cpu' needs its native kernel" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_serve_refuses_a_backend_that_cannot_run_before_binding(capsys, monkeypatch):
    from glmserve.kernels.cpu import native as cpu_native
    monkeypatch.setenv(cpu_native.ENV_SWITCH, "0")
    code, out, err = _run_cli(capsys, "serve", "--model", "glm-tiny", "--attention-backend", "cpu", "--port", "0",
                              "--metrics-port", "-1")
    assert code == 2 and "attention_backend 'cpu' needs its native kernel" in err and "Traceback" not in err
    assert "serving on" not in out      # refused before the port is bound, like a bad --model


def test_serve_refuses_a_negative_message_budget(capsys):
    code, out, err = _run_cli(capsys, "serve", "--model", "glm-tiny", "--max-stream-messages-per-s", "-1",
                              "--port", "0")
    assert code == 2 and "--max-stream-messages-per-s must be >= 0, got -1" in err and "serving on" not in out


def test_serve_refuses_a_bad_stream_interval(capsys):
    code, out, err = _run_cli(capsys, "serve", "--model", "glm-tiny", "--stream-interval-ms", "-5", "--port", "0")
    assert code == 2 and "--stream-interval-ms must be in [0, 1000]" in err and "serving on" not in out
