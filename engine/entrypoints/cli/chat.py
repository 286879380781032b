"""``glmserve chat``: a streaming terminal chat with a running server, like ChatGLM3's CLI demo.

The conversation is kept and sent whole with every turn; ``clear`` starts over, ``stop`` (or end of input) exits.
grpc is imported only when the command runs.
"""
from __future__ import annotations

import argparse
import os
import sys

from glmserve.engine.entrypoints.cli.env import API_KEY_ENV

WELCOME = "Chatting with {model} at {target}. Type 'clear' to start over, 'stop' to exit."


def add_chat_parser(sub) -> None:
    p = sub.add_parser("chat", help="chat with a running server in the terminal")
    p.add_argument("--target", default="localhost:50051", help="HOST:PORT of the server (default: %(default)s)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV), help=f"default: ${API_KEY_ENV}")
    p.add_argument("--tls", action="store_true", help="connect with TLS (system roots, or --tls-ca)")
    p.add_argument("--tls-ca", default=None, help="PEM root certificate(s) to trust")
    p.add_argument("--system", default=None, help="a system message to start every conversation with")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--timeout", type=float, default=None, help="deadline of each reply in seconds")


def run_chat(args: argparse.Namespace) -> int:
    import grpc

    from glmserve.engine.entrypoints.grpc.client import GenerationClient
    root = None
    if args.tls_ca is not None:
        try:
            with open(args.tls_ca, "rb") as f:
                root = f.read()
        except OSError as exc:
            raise ValueError(f"cannot read --tls-ca {args.tls_ca}: {exc.strerror or exc}") from None
    with GenerationClient(args.target, api_key=args.api_key, tls=args.tls, root_certificates=root) as client:
        try:
            model = client.model_info(timeout=10).model
        except grpc.RpcError as exc:
            print(f"glmserve chat: cannot reach {args.target}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        print(WELCOME.format(model=model, target=args.target))
        return _repl(client, args, grpc.RpcError)


def _initial_history(args) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system else []


def _repl(client, args, rpc_error) -> int:
    history = _initial_history(args)
    while True:
        try:
            query = input("\nUser: ").strip()
        except EOFError:
            print()
            return 0
        if query == "stop":
            return 0
        if query == "clear":
            history = _initial_history(args)
            print("(history cleared)")
            continue
        if not query:
            continue
        history.append({"role": "user", "content": query})
        print("\nChatGLM: ", end="", flush=True)
        reply = []
        try:
            for chunk in client.chat(history, temperature=args.temperature, top_p=args.top_p,
                                     max_tokens=args.max_tokens, timeout=args.timeout):
                print(chunk.text, end="", flush=True)
                reply.append(chunk.text)
        except rpc_error as exc:
            print(f"\n[error: {exc.code().name}: {exc.details()}]")
            history.pop()   # the turn did not happen
            continue
        except KeyboardInterrupt:   # stop this reply (the call is cancelled), keep chatting
            print("\n[interrupted]")
        print()
        history.append({"role": "assistant", "content": "".join(reply)})
