"""``glmserve serve``: the server as a process: gRPC and the OpenAI-compatible HTTP API over one engine core.

Prints machine-readable lifecycle lines on stdout (tests and scripts wait for them)::

    glmserve: serving on HOST:PORT metrics on PORT http on PORT
                                                       (bound; health NOT_SERVING / 503 while the model loads;
                                                        a port that is off reads "off")
    glmserve: engine core pid PID                      (the engine core's own process, loading the model)
    glmserve: ready                                    (health SERVING)
    glmserve: drained N in-flight requests, exiting    (after SIGTERM/SIGINT; exit code 0)

If the drain timeout passes first, the requests still running are cancelled (and aborted), and the exit code is 0
all the same: the process did what a SIGTERM asks.
grpc (and FastAPI) are imported only when the command runs, so the CLI and the engine stay importable without
them.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from glmserve.engine.config.options import add_engine_arguments, engine_config_from_args
from glmserve.engine.entrypoints.cli.env import API_KEY_ENV
from glmserve.engine.entrypoints.server_options import ServerOptions



def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the server (gRPC and the OpenAI-compatible HTTP API)",
                       description="Serve a model over gRPC (glmserve.v1.Generation, health, reflection) and "
                                   "OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models, /health), "
                                   "with Prometheus metrics.")
    add_engine_arguments(p)
    g = p.add_argument_group("server")
    # No default here: ServerOptions.host (127.0.0.1) is the one definition, applied in run_serve.
    g.add_argument("--host", default=None,
                   help="address for gRPC, HTTP and metrics (default: 127.0.0.1, this machine only; 0.0.0.0 listens on "
                        "every interface, as the container image and the Kubernetes manifests ask)")
    g.add_argument("--port", type=int, default=50051, help="gRPC port; 0 picks a free one (default: %(default)s)")
    g.add_argument("--http-port", type=int, default=8000,
                   help="OpenAI-compatible HTTP API port; 0 picks a free one, -1 turns it off (default: %(default)s)")
    g.add_argument("--served-model-name", default=None,
                   help="the model id of the HTTP API (its 'model' field, /v1/models) (default: the model's name)")
    g.add_argument("--metrics-port", type=int, default=9090,
                   help="Prometheus /metrics port; 0 picks a free one, -1 turns it off (default: %(default)s)")
    g.add_argument("--drain-timeout", type=float, default=30.0,
                   help="seconds in-flight requests get to finish after SIGTERM (default: %(default)s)")
    g.add_argument("--max-waiting-requests", type=int, default=None,
                   help="refuse new requests with RESOURCE_EXHAUSTED while this many wait (default: no limit)")
    g.add_argument("--stream-interval-ms", type=float, default=ServerOptions.stream_interval_ms,
                   help="a streamed message carries the tokens of at least this many milliseconds (the first token "
                        "goes out at once): fewer, larger messages cost the server and its clients less CPU "
                        "(default: %(default)s)")
    g.add_argument("--max-stream-messages-per-s", type=float, default=ServerOptions.max_stream_messages_per_s,
                   help="all streams together send at most about this many messages a second: with more samples "
                        "running than the stream interval allows for, each stream's interval grows to running / rate "
                        "(a stream's first and closing messages go out at once); 0: no limit (default: %(default)s)")
    g.add_argument("--frontend-cpus", type=int, default=ServerOptions.frontend_cpus,
                   help="CPU cores reserved for the frontend process (CPU device): the engine core is bound to the "
                        "others, one torch thread each, and the frontend to these; 0: no binding, the engine takes "
                        "every core; an explicit OMP_NUM_THREADS turns the binding off (default: %(default)s)")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'authorization: Bearer KEY' (gRPC metadata, HTTP header) (default: ${API_KEY_ENV}); "
                        "health checks are exempt")
    g.add_argument("--tls-cert", default=None,
                   help="PEM certificate chain; serve TLS on the gRPC and HTTP ports (with --tls-key)")
    g.add_argument("--tls-key", default=None, help="PEM private key")
    g.add_argument("--max-message-bytes", type=int, default=16 * 1024 * 1024,
                   help="largest gRPC request or response message, and largest HTTP request body (413 past it) "
                        "(default: %(default)s)")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run_serve(args: argparse.Namespace) -> int:
    from glmserve.engine.attention.backends import check_backend
    from glmserve.engine.model.loader import resolve_model_source
    from glmserve.engine.entrypoints.server_options import ServerOptions
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for path in (args.tls_cert, args.tls_key):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"TLS file {path} does not exist")
    host = {} if args.host is None else {"host": args.host}
    options = ServerOptions(
        **host, port=args.port, http_port=None if args.http_port < 0 else args.http_port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port, drain_timeout=args.drain_timeout,
        max_waiting_requests=args.max_waiting_requests, stream_interval_ms=args.stream_interval_ms,
        max_stream_messages_per_s=args.max_stream_messages_per_s, frontend_cpus=args.frontend_cpus,
        api_key=args.api_key,
        served_model_name=args.served_model_name, tls_cert=args.tls_cert, tls_key=args.tls_key,
        max_message_bytes=args.max_message_bytes)
    config = engine_config_from_args(args)
    # A bad --model or an attention backend that cannot run here fails before the port is bound.
    resolve_model_source(config.model, config.load_format, config.tokenizer)
    check_backend(config.attention_backend, config.device)
    try:
        return asyncio.run(serve(config, options))
    except OSError as exc:   # the port is taken, a TLS file is unreadable, ...
        print(f"glmserve serve: error: {exc}", file=sys.stderr)
        return 1


async def serve(config, options) -> int:
    from glmserve.engine.entrypoints.serving import ModelServer
    from glmserve.engine.runtime.core_client import ProcessEngineCore
    from glmserve.engine.runtime.cpu_placement import bind_this_process, plan_cpu_placement
    from glmserve.engine.runtime.startup_heap import freeze_startup_heap, unfreeze_heap
    server = ModelServer(options)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)   # repeated signals change nothing: --drain-timeout bounds the wait
    placement = plan_cpu_placement(str(config.device), options.frontend_cpus)
    # Before the servers start their threads (bind_this_process binds those there are anyway).
    cores_before = None if placement is None else bind_this_process(placement.frontend)
    frozen = False
    try:
        await server.start()
        metrics = "off" if server.metrics_port is None else str(server.metrics_port)
        http = "off" if server.http_port is None else str(server.http_port)
        print(f"glmserve: serving on {options.host}:{server.port} metrics on {metrics} http on {http}", flush=True)
        engine_core = ProcessEngineCore(config, frontend_cpus=options.frontend_cpus,      # loads the model there
                                        engine_cpus=None if placement is None else placement.engine)
        cores = "" if placement is None else (f" on CPUs {_cpu_list(placement.engine)}, the frontend on CPUs "
                                              f"{_cpu_list(placement.frontend)}")
        print(f"glmserve: engine core pid {engine_core.pid}{cores}", flush=True)
        load = asyncio.ensure_future(server.load(engine_core.wait_ready))
        signalled = asyncio.ensure_future(stop.wait())
        await asyncio.wait([load, signalled], return_when=asyncio.FIRST_COMPLETED)
        if not load.done():   # a signal during start-up: stop the engine core where it is, and leave
            engine_core.shutdown()
            load.cancel()
            print("glmserve: stopped while loading, exiting", flush=True)
            return 0
        load.result()   # raises what the load raised
        freeze_startup_heap()    # this frontend's imports (torch included) are never garbage: see startup_heap.py
        frozen = True
        print("glmserve: ready", flush=True)
        await signalled
        in_flight, finished = await server.drain()
        if finished:
            print(f"glmserve: drained {in_flight} in-flight requests, exiting", flush=True)
        else:
            print(f"glmserve: drain timed out after {options.drain_timeout}s; cancelled the requests still "
                  "running, exiting", flush=True)
        return 0
    finally:
        await server.stop()
        # serve() may run inside a larger program (the tests): leave it as it was
        if cores_before is not None:
            bind_this_process(cores_before)
        if frozen:
            unfreeze_heap()


def _cpu_list(cpus) -> str:
    return ",".join(map(str, sorted(cpus)))
