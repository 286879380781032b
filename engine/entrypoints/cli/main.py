"""The ``glmserve`` command: make-test-model, generate, tokenize, serve, chat.

Bad flags or paths end with a one-line message and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from glmserve.engine.config.model_config import MODEL_PRESETS, preset_names
from glmserve.engine.config.options import add_engine_arguments, engine_config_from_args

EXIT_USAGE = 2


class CliError(Exception):
    """A user error: printed as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmserve", description="A serving engine for ChatGLM3.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-test-model", help="write a ChatGLM3-format checkpoint with random weights")
    p.add_argument("dir")
    p.add_argument("--preset", default="glm-tiny", choices=preset_names())
    p.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    p.add_argument("--shards", type=int, default=1)
    p.add_argument("--tokenizer", default=None, help="tokenizer.model to ship (default: the embedded one)")
    p.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"])
    p.add_argument("--quantization-bit", type=int, default=0, choices=[0, 4, 8])
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("generate", help="run one request through the engine")
    add_engine_arguments(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt")
    src.add_argument("--prompt-token-ids", help="comma-separated token ids")
    src.add_argument("--chat", help="a JSON file with a list of {role, content, metadata?, tools?} messages")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--adapter", default=None, help="run under a fine-tune loaded with --lora or --ptuning")
    p.add_argument("--json", action="store_true", help="print {token_ids, text, finish_reason} as JSON")

    p = sub.add_parser("tokenize", help="print the prompt token ids of a text or a chat")
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", default=None)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--text")
    src.add_argument("--chat")
    p.add_argument("--json", action="store_true")

    from glmserve.engine.entrypoints.cli.serve import add_serve_parser
    add_serve_parser(sub)
    from glmserve.engine.entrypoints.cli.chat import add_chat_parser
    add_chat_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)   # argparse itself exits 2 with a one-line message on bad flags
    try:
        return COMMANDS[args.command](args) or 0
    except CliError as exc:
        print(f"glmserve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:   # config, checkpoint, tokenizer, sampling and request errors
        print(f"glmserve {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def cmd_make_test_model(args) -> int:
    import dataclasses

    import torch

    from glmserve.engine.model.checkpoint_writer import write_checkpoint
    from glmserve.engine.text.tokenizer import embedded_tokenizer_path
    tokenizer = args.tokenizer or embedded_tokenizer_path()
    if not Path(tokenizer).is_file():
        raise CliError(f"tokenizer file {tokenizer} does not exist")
    if args.shards < 1:
        raise CliError(f"--shards must be >= 1, got {args.shards}")
    config = dataclasses.replace(MODEL_PRESETS[args.preset], quantization_bit=args.quantization_bit)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    try:
        out = write_checkpoint(args.dir, config, tokenizer, fmt=args.format, shards=args.shards, seed=args.seed,
                               dtype=dtype)
    except OSError as exc:
        raise CliError(f"cannot write {args.dir}: {exc.strerror or exc}") from None
    print(f"wrote a {args.preset} checkpoint ({args.format}, {args.shards} shard(s)) to {out}")
    return 0


def _read_chat(path: str):
    from glmserve.engine.text.chat_format import messages_from_json
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"cannot read chat file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CliError(f"chat file {path} is not valid JSON: {exc}") from None
    return messages_from_json(raw)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise CliError(f"--prompt-token-ids must be comma-separated integers, got {text!r}") from None


def cmd_generate(args) -> int:
    from glmserve.engine.core.outputs import RequestOutput
    from glmserve.engine.core.sampling_params import SamplingParams
    from glmserve.engine.entrypoints.chat import ChatTemplate
    from glmserve.engine.runtime.engine_core import EngineCore
    chat_messages = _read_chat(args.chat) if args.chat else None
    engine = EngineCore(engine_config_from_args(args))
    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                top_k=args.top_k, ignore_eos=args.ignore_eos)
        chat = ChatTemplate(engine.tokenizer)
        if chat_messages is not None:
            prompt, params = chat.prompt(chat_messages), chat.sampling_params(params)
        elif args.prompt is not None:
            prompt = engine.tokenizer.encode(args.prompt)
        else:
            prompt = _parse_ids(args.prompt_token_ids)
        engine.add_request("cli", prompt, params, adapter=args.adapter)
        result = RequestOutput.empty("cli", prompt, 1)
        for delta in engine.step_until_idle():
            if not args.json:
                print(delta.outputs[0].text, end="", flush=True)
            result.merge(delta)
    finally:
        engine.shutdown()
    out = result.outputs[0]
    if chat_messages is not None:
        chat.finish(out)
    if args.json:
        print(json.dumps({"token_ids": out.token_ids, "text": out.text, "finish_reason": out.finish_reason},
                         ensure_ascii=False))
    else:
        print(f"\n[finish_reason={out.finish_reason}, {len(out.token_ids)} tokens]", file=sys.stderr)
    return 0


def cmd_tokenize(args) -> int:
    from glmserve.engine.text.chat_format import build_chat_prompt
    from glmserve.engine.model.loader import resolve_model_source
    from glmserve.engine.text.tokenizer import ChatGLMTokenizer
    source = resolve_model_source(args.model, "auto", args.tokenizer)
    tokenizer = ChatGLMTokenizer.from_file(source.tokenizer_path)
    ids = build_chat_prompt(tokenizer, _read_chat(args.chat)) if args.chat else tokenizer.encode(args.text)
    print(json.dumps({"token_ids": ids}) if args.json else " ".join(map(str, ids)))
    return 0


def _serve(args) -> int:
    from glmserve.engine.entrypoints.cli.serve import run_serve
    return run_serve(args)


def _chat(args) -> int:
    from glmserve.engine.entrypoints.cli.chat import run_chat
    return run_chat(args)


COMMANDS = {"make-test-model": cmd_make_test_model, "generate": cmd_generate, "tokenize": cmd_tokenize,
            "serve": _serve, "chat": _chat}

if __name__ == "__main__":
    sys.exit(main())
