"""Continuous batching: which requests run this step, and how many tokens each.

Each step has a token budget (``max_num_batched_tokens``) and a sequence limit (``max_num_seqs``). Running
requests go first (decodes before prefill chunks, so a long prompt never stalls the decodes beside it), then
waiting ones in (priority, arrival) order. When the KV pool runs dry, the latest running request is preempted by
recompute (its blocks freed, its computed count reset) and nothing new is admitted that step.

LoRA: at most ``max_loras`` distinct adapters run at once (the model runner holds that many resident). A waiting
request whose adapter would be one too many is passed over until one of the running adapters has no request left;
requests behind it are still admitted.

The scheduler returns data; it never calls the model.
"""
from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

from glmserve.engine.core.block_manager import BlockManager
from glmserve.engine.config.engine_config import SchedulerConfig
from glmserve.engine.core.request import FinishReason, Request, RequestKey, RequestStatus


@dataclass
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)    # tokens each request computes this step
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    num_steps: int = 0


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, max_model_len: int,
                 eos_token_id: int, max_loras: int | None = None):
        self.config = config
        self.max_loras = max_loras
        self.eos_token_id = eos_token_id
        self.block_manager = block_manager
        self.max_model_len = max_model_len
        self.waiting: list[tuple[int, int, Request]] = []     # heap of (priority, arrival order, request)
        self.running: list[Request] = []                      # in admission order (newest last)
        self.requests: dict[RequestKey, Request] = {}
        self._arrivals = itertools.count()
        self._order: dict[RequestKey, int] = {}
        self.stats = SchedulerStats()

    # ---- requests in and out ----------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        if request.key in self.requests:
            raise ValueError(f"request {request.key!r} is already in flight")
        self.requests[request.key] = request
        self._order[request.key] = next(self._arrivals)
        self._push_waiting(request)

    def abort(self, key: RequestKey) -> Request | None:
        """Finish a request wherever it is and free its blocks at once."""
        request = self.requests.get(key)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting = [entry for entry in self.waiting if entry[2] is not request]
            heapq.heapify(self.waiting)
        self._finish(request, FinishReason.ABORT)
        return request

    def finish(self, request: Request, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        """Finish a running request (stop condition met)."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        self._finish(request, reason, stop_reason)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ---------------------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        self.stats.num_steps += 1
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        # Decodes first, then running prefill chunks, each group in admission order.
        for request in sorted(self.running, key=lambda r: r.num_tokens - r.num_computed_tokens > 1):
            if budget == 0:
                break
            if request.status is not RequestStatus.RUNNING:   # preempted earlier in this loop
                continue
            num_new = self._num_new_tokens(request, budget)
            if num_new == 0:
                continue
            if self._allocate_or_preempt(request, num_new, batch):
                batch.requests.append(request)
                batch.num_new_tokens.append(num_new)
                budget -= num_new
        if not batch.preempted:
            budget = self._admit_waiting(batch, budget)
        now = time.monotonic()
        for request in batch.requests:
            if request.times.first_scheduled is None:
                request.times.first_scheduled = now
        return batch

    def running_lora_adapters(self) -> set[str]:
        return {r.adapter.name for r in self.running if r.adapter is not None and r.adapter.is_lora}

    def _admit_waiting(self, batch: ScheduledBatch, budget: int) -> int:
        loras = self.running_lora_adapters()
        # Passed over this step, without holding up the rest: a LoRA request past max_loras, and a constrained
        # request whose grammar is still compiling.
        passed_over = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0][2]
            adapter = request.adapter
            if (adapter is not None and adapter.is_lora and self.max_loras is not None
                    and adapter.name not in loras and len(loras) >= self.max_loras):
                passed_over.append(heapq.heappop(self.waiting))
                continue
            if request.grammar is not None and not request.grammar.is_ready:
                passed_over.append(heapq.heappop(self.waiting))
                continue
            cached = self.block_manager.find_cached_prefix(request)
            num_cached = self.block_manager.cached_tokens(request, cached)
            remaining = request.num_tokens - num_cached
            if remaining > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(remaining, budget)
            if not self.block_manager.allocate(request, num_new, cached):
                break
            heapq.heappop(self.waiting)
            self.block_manager.record_prefix_lookup(request.num_tokens, num_cached)
            if request.num_preemptions == 0:
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.requests.append(request)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
            if adapter is not None and adapter.is_lora:
                loras.add(adapter.name)
        for entry in passed_over:
            heapq.heappush(self.waiting, entry)
        return budget

    def _num_new_tokens(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining > budget and not self.config.enable_chunked_prefill:
            return 0
        return min(remaining, budget)

    def _allocate_or_preempt(self, request: Request, num_new: int, batch: ScheduledBatch) -> bool:
        """Allocate blocks for ``request``, preempting the latest-admitted lower-or-equal-priority requests
        until it fits. Returns False if ``request`` itself had to be preempted."""
        while not self.block_manager.allocate(request, num_new):
            victim = max(self.running, key=lambda r: (r.priority, self._order[r.key]))
            self._preempt(victim, batch)
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request, batch: ScheduledBatch) -> None:
        self.running.remove(request)
        if request in batch.requests:   # already scheduled this step: take it back out
            i = batch.requests.index(request)
            del batch.requests[i], batch.num_new_tokens[i]
        self.block_manager.free(request)
        request.status = RequestStatus.WAITING
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.stats.num_preemptions += 1
        batch.preempted.append(request)
        self._push_waiting(request)

    # ---- after the model ran ----------------------------------------------------------------------------------
    def update(self, batch: ScheduledBatch, sampled: list[int | None]) -> list[tuple[Request, int]]:
        """Advance computed counts, append sampled tokens and apply token-level stop conditions.

        ``sampled[i]`` is the token sampled for ``batch.requests[i]``, or None for a prefill chunk that did not
        reach the end of its tokens. Returns (request, new token) pairs; finished requests are already finished.
        """
        new_tokens: list[tuple[Request, int]] = []
        now = time.monotonic()
        for request, num_new, token in zip(batch.requests, batch.num_new_tokens, sampled):
            if request.is_finished:   # aborted while the step ran
                continue
            request.num_computed_tokens += num_new
            if token is None:
                continue
            request.token_ids.append(token)
            if request.times.first_token is None:
                request.times.first_token = now
            request.times.last_token = now
            new_tokens.append((request, token))
            self._check_token_stop(request, token)
        return new_tokens

    def _check_token_stop(self, request: Request, token: int) -> None:
        params = request.params
        if request.num_output_tokens >= params.min_tokens:
            if token == self.eos_token_id and not params.ignore_eos:
                self.finish(request, FinishReason.STOP, token)
                return
            if token in request.stop_ids:
                self.finish(request, FinishReason.STOP, token)
                return
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            self.finish(request, FinishReason.LENGTH)
        elif request.num_tokens >= self.max_model_len:
            self.finish(request, FinishReason.LENGTH)

    # ---- internals --------------------------------------------------------------------------------------------
    def _push_waiting(self, request: Request) -> None:
        heapq.heappush(self.waiting, (request.priority, self._order[request.key], request))

    def _finish(self, request: Request, reason: FinishReason, stop_reason: int | str | None = None) -> None:
        self.block_manager.free(request)
        request.finish(reason, stop_reason)
        del self.requests[request.key]
        del self._order[request.key]
