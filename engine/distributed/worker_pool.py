"""Rank 0's handle on the worker ranks 1..N-1: start them, talk to them, watch them, stop them.

Workers are spawned processes (torch.multiprocessing, start method ``spawn``). A watchdog thread waits on their
process sentinels: a worker that dies turns into a ``TensorParallelError`` on rank 0 at the next step, or at once
when rank 0 is blocked in a collective with it (gloo reports the closed connection; collectives also time out).
Workers follow rank 0 out: on ``Shutdown``, or when their command pipe closes because rank 0 exited or died.
"""
from __future__ import annotations

import logging
import threading
import time
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist
import torch.multiprocessing

from glmserve.engine.config.engine_config import EngineConfig
from glmserve.engine.distributed.group import Rendezvous, TensorParallelGroup, backend_for, create_store
from glmserve.engine.distributed.protocol import Command, Reply, Shutdown, WorkerFailed, WorkerJoining, WorkerReady, WorkerSpec
from glmserve.engine.distributed.worker import worker_main

log = logging.getLogger(__name__)

# How long a worker gets to finish what it is doing and exit after Shutdown before it is killed.
SHUTDOWN_GRACE_S = 10.0
# How long a failed step waits for the watchdog to name the dead worker (the collective can fail first).
DEATH_NOTICE_S = 2.0


class TensorParallelError(RuntimeError):
    """A worker rank failed or died: the tensor-parallel engine cannot serve any more."""


class WorkerPool:
    def __init__(self, config: EngineConfig, timeout_s: float, threads_per_rank: int):
        if dist.is_initialized():
            raise RuntimeError("this process already belongs to a process group: one tensor-parallel engine per "
                               "process (shut the other one down first)")
        world_size = config.tensor_parallel_size
        self._store = create_store(world_size, timeout_s)
        self.rendezvous = Rendezvous(self._store.port, world_size, backend_for(torch.device(config.device)),
                                     timeout_s)
        self.group: TensorParallelGroup | None = None
        self._failure: TensorParallelError | None = None
        self._closing = False
        self._send_lock = threading.Lock()
        self._recv_lock = threading.RLock()    # the watchdog reads a dead worker's last words too
        self._last_words: dict[int, WorkerFailed] = {}
        ctx = torch.multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs = []
        for rank in range(1, world_size):
            parent_end, child_end = ctx.Pipe(duplex=True)
            spec = WorkerSpec(rank, self.rendezvous, config, threads_per_rank)
            proc = ctx.Process(target=worker_main, args=(spec, child_end), name=f"glmserve-tp-rank{rank}", daemon=True)
            proc.start()
            child_end.close()    # the worker holds the only other end: it reads EOF when this process goes away
            self._conns.append(parent_end)
            self._procs.append(proc)
        threading.Thread(target=self._watch, name="glmserve-tp-watchdog", daemon=True).start()

    @property
    def worker_pids(self) -> list[int]:
        """The worker processes, rank 1 first."""
        return [proc.pid for proc in self._procs]

    # ---- start-up ----------------------------------------------------------------------------------------------
    def join_group(self) -> TensorParallelGroup:
        """Join the process group as rank 0 once every worker is about to (so a worker that dies while starting
        fails the start-up instead of leaving rank 0 waiting in the rendezvous)."""
        self.expect(WorkerJoining)
        self.group = TensorParallelGroup.join(self.rendezvous, 0, self._store)
        return self.group

    # ---- messages ----------------------------------------------------------------------------------------------
    def send(self, command: Command) -> None:
        self.check()
        with self._send_lock:
            for rank, conn in enumerate(self._conns, start=1):
                try:
                    conn.send(command)
                except OSError:
                    raise self._worker_died(rank) from None

    def expect(self, reply_type: type) -> list[Reply]:
        """One reply of ``reply_type`` from every worker, in rank order; a failure report or a death raises."""
        replies = []
        for rank, (conn, proc) in enumerate(zip(self._conns, self._procs), start=1):
            ready = wait([conn, proc.sentinel], timeout=self.rendezvous.timeout_s)
            if not ready:
                raise self._fail(TensorParallelError(
                    f"tensor-parallel rank {rank} did not answer within {self.rendezvous.timeout_s:g}s"))
            reply = self._receive(rank) if conn in ready else None
            if reply is None or isinstance(reply, WorkerFailed):
                raise self._worker_died(rank)
            if not isinstance(reply, reply_type):
                raise self._fail(TensorParallelError(f"tensor-parallel rank {rank} answered {reply!r}, "
                                                     f"expected {reply_type.__name__}"))
            replies.append(reply)
        return replies

    def request(self, command: Command, reply_type: type = WorkerReady) -> list[Reply]:
        self.send(command)
        return self.expect(reply_type)

    # ---- failures ----------------------------------------------------------------------------------------------
    def check(self) -> None:
        """Raise the recorded failure, if any: once a rank is lost, every later step fails the same way."""
        if self._failure is not None:
            raise self._failure

    def failure_for(self, exc: BaseException) -> TensorParallelError:
        """The error to raise for a step that failed part-way: the dead worker's, when one died (its collective
        can fail just before the watchdog sees the exit), otherwise the step's own. Either way the ranks are out
        of step for good, so the failure is recorded."""
        if isinstance(exc, TensorParallelError):
            return exc
        deadline = time.monotonic() + DEATH_NOTICE_S
        while self._failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        return self._fail(TensorParallelError(f"a tensor-parallel step failed: {type(exc).__name__}: {exc}"))

    def _fail(self, error: TensorParallelError) -> TensorParallelError:
        if self._failure is None:
            self._failure = error
        return self._failure

    def _receive(self, rank: int) -> Reply | None:
        """The next reply of a worker, or None when its end is closed. A failure report is kept for the error."""
        with self._recv_lock:
            try:
                reply = self._conns[rank - 1].recv()
            except (EOFError, OSError):
                return None
            if isinstance(reply, WorkerFailed):
                self._last_words[rank] = reply
            return reply

    def _worker_died(self, rank: int) -> TensorParallelError:
        """The error for a worker that is gone, with the traceback it reported if it had time to."""
        conn, proc = self._conns[rank - 1], self._procs[rank - 1]
        with self._recv_lock:
            try:
                while conn.poll() and self._receive(rank) is not None:
                    pass
            except OSError:
                pass
        proc.join(DEATH_NOTICE_S)
        last_words = self._last_words.get(rank)
        if last_words is not None:
            return self._fail(TensorParallelError(f"tensor-parallel rank {rank} failed:\n{last_words.error}"))
        return self._fail(TensorParallelError(
            f"tensor-parallel rank {rank} (pid {proc.pid}) died with exit code {proc.exitcode}"))

    def _watch(self) -> None:
        ready = wait([proc.sentinel for proc in self._procs])
        if self._closing:
            return
        rank = next(r for r, proc in enumerate(self._procs, start=1) if proc.sentinel in ready)
        error = self._worker_died(rank)
        log.error("%s; the engine cannot serve any more", error)

    # ---- shutdown ----------------------------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop every worker (asked first, killed after a grace period) and leave the group. Idempotent."""
        if self._closing:
            return
        self._closing = True
        with self._send_lock:
            for conn in self._conns:
                try:
                    conn.send(Shutdown())
                except OSError:
                    pass
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        for proc in self._procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        if self.group is not None:
            self.group.leave()
