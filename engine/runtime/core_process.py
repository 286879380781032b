"""The engine core's own process: build the engine, warm it up, then run the core loop over a pipe to the frontend.

Started with ``spawn`` by ProcessEngineCore. It exits on Shutdown, or when the pipe closes because the frontend
exited or died. Ctrl-C in a terminal reaches every process of the group; the frontend decides when this one stops.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
from multiprocessing.connection import Connection

import torch

from glmserve.engine.config.engine_config import EngineConfig
from glmserve.engine.runtime.core_loop import CoreLoop
from glmserve.engine.runtime.cpu_placement import bind_this_process
from glmserve.engine.runtime.engine_core import EngineCore
from glmserve.engine.runtime.messages import Command, EngineFailed, EngineReady
from glmserve.engine.runtime.startup_heap import freeze_startup_heap


def run_engine_core_process(config: EngineConfig, conn: Connection, log_level: int, frontend_cpus: int,
                            engine_cpus: frozenset[int] | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)    # the frontend drains first, then sends Shutdown
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if engine_cpus is not None:
        bind_this_process(engine_cpus)
        torch.set_num_threads(len(engine_cpus))
    else:
        leave_cpus_to_the_frontend(config, frontend_cpus)
    try:
        core = EngineCore(config)
        core.warm_up()
    except BaseException as exc:  # noqa: BLE001 - the frontend reports it (a ConfigError is a user error)
        conn.send(EngineFailed(f"the engine failed to start: {type(exc).__name__}: {exc}", error=_picklable(exc)))
        return
    freeze_startup_heap()       # the model and torch: never garbage, and a stall of every step a full collection
    try:
        conn.send(EngineReady(core.info(), core.stats()))
        CoreLoop(core, lambda timeout: _receive(conn, timeout), conn.send).run()
    except (EOFError, OSError):
        pass   # the frontend is gone: nothing left to serve
    finally:
        core.shutdown()
        conn.close()
    os._exit(0)   # nothing is left to release; skips seconds of interpreter teardown of torch


def leave_cpus_to_the_frontend(config: EngineConfig, frontend_cpus: int) -> None:
    """On the CPU, torch's threads take every core by default, and its OpenMP threads spin while they wait for each
    other: beside a busy frontend process (protobuf, HTTP, the clients' streams) every parallel op of the engine
    stalls on a thread that is not running. So the engine core leaves ``frontend_cpus`` cores to its frontend, as
    vLLM's CPU backend reserves a core for its API server. An explicit OMP_NUM_THREADS is taken as it is.
    (``glmserve serve`` binds the processes to their cores as well: cpu_placement.py.)"""
    if torch.device(config.device).type != "cpu" or frontend_cpus <= 0 or os.environ.get("OMP_NUM_THREADS"):
        return
    torch.set_num_threads(max(1, torch.get_num_threads() - frontend_cpus))


def _receive(conn: Connection, timeout: float | None) -> list[Command]:
    if not conn.poll(timeout):
        return []
    commands = [conn.recv()]
    while conn.poll(0):
        commands.append(conn.recv())
    return commands


def _picklable(exc: BaseException) -> BaseException | None:
    """The exception itself when it survives pickling (ConfigError, CheckpointError...), else None."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return None
