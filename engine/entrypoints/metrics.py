"""Prometheus metrics of a server, in a private registry (several servers can live in one process).

Engine-side values come from an AsyncEngine step listener, called once per engine step with the step's event
(the engine's counters and every request's delta): a step costs a handful of gauge sets and one histogram
observation per new token. Latencies use the engine core's own timestamps (time.monotonic, one clock for every
process of the machine). gRPC calls are counted by the servicer, HTTP calls by the HTTP API's outer layer.
The names and their vLLM equivalents are listed in the README (section Metrics).
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from glmserve.engine.core.outputs import RequestOutput
from glmserve.engine.runtime.engine_info import EngineInfo, EngineStats
from glmserve.engine.runtime.messages import StepDone

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                   10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
TOKEN_BUCKETS = tuple(float(2 ** i) for i in range(16))   # 1 .. 32768


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.model_info = Info("glmserve_model", "Served model and its limits", registry=r)
        self.cache_config_info = Info("glmserve_cache_config", "KV cache configuration", registry=r)
        self.num_running = Gauge("glmserve_num_requests_running", "Requests (samples) in the running batch",
                                 registry=r)
        self.num_waiting = Gauge("glmserve_num_requests_waiting", "Requests (samples) waiting to be scheduled",
                                 registry=r)
        self.kv_usage = Gauge("glmserve_kv_cache_usage_ratio", "Fraction of KV cache blocks in use (0..1)",
                              registry=r)
        self.prompt_tokens = Counter("glmserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("glmserve_generation_tokens", "Generated tokens", registry=r)
        self.request_success = Counter("glmserve_request_success", "Finished samples by finish reason",
                                       ["finish_reason"], registry=r)
        self.preemptions = Counter("glmserve_num_preemptions", "Requests preempted (recomputed later)",
                                   registry=r)
        self.prefix_queries = Counter("glmserve_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                                      registry=r)
        self.prefix_hits = Counter("glmserve_prefix_cache_hits", "Prompt tokens found in the prefix cache",
                                   registry=r)
        self.ttft = Histogram("glmserve_time_to_first_token_seconds", "Arrival to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("glmserve_inter_token_latency_seconds", "Time between consecutive tokens of a sample",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("glmserve_e2e_request_latency_seconds", "Arrival to finish", buckets=LATENCY_BUCKETS,
                             registry=r)
        self.queue_time = Histogram("glmserve_request_queue_time_seconds", "Arrival to first scheduled",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_len = Histogram("glmserve_request_prompt_tokens", "Prompt length of finished requests",
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.generation_len = Histogram("glmserve_request_generation_tokens", "Generated tokens per finished sample",
                                        buckets=TOKEN_BUCKETS, registry=r)
        self.step_tokens = Histogram("glmserve_iteration_tokens", "Tokens computed per engine step",
                                     buckets=TOKEN_BUCKETS, registry=r)
        self.grpc_requests = Counter("glmserve_grpc_requests", "gRPC calls by method and status code",
                                     ["method", "code"], registry=r)
        # The Gateway API Inference Extension's LoRA affinity reads this shape (vLLM's vllm:lora_requests_info):
        # adapter names comma-separated in labels, the value the time of the last update. Only the current label
        # set is kept, so the series with the newest value is the only one.
        self.lora_info = Gauge("glmserve_lora_requests_info", "LoRA adapters with running and waiting requests, and "
                               "how many may run at once (value: Unix time of the last update)",
                               ["max_lora", "running_lora_adapters", "waiting_lora_adapters"], registry=r)
        self._lora_labels: tuple[str, str, str] | None = None
        self._max_lora = 0
        self.http_requests = Counter("glmserve_http_requests", "HTTP calls by route and status (499: the client "
                                     "left first)", ["route", "status"], registry=r)
        self._last_token_time: dict[tuple[str, int], float] = {}
        self._num_generated: dict[tuple[str, int], int] = {}
        self._totals = {"num_preemptions": 0, "prefix_cache_queries": 0, "prefix_cache_hits": 0}
        self._httpd = None

    # ---- setup ----------------------------------------------------------------------------------------------
    def describe_engine(self, info: EngineInfo, stats: EngineStats) -> None:
        """Fill the info metrics and start the cumulative counters from the engine's totals after its warm-up."""
        self.model_info.info({"model": info.model_name, "max_model_len": str(info.max_model_len),
                              "dtype": info.dtype, "device": info.device})
        # num_gpu_blocks repeats num_kv_blocks under the label name of the inference gateways' model-server
        # protocol (vLLM's vllm:cache_config_info{block_size,num_gpu_blocks}), which the endpoint picker reads.
        self.cache_config_info.info({"block_size": str(info.block_size), "num_kv_blocks": str(info.num_kv_blocks),
                                     "num_gpu_blocks": str(info.num_kv_blocks),
                                     "enable_prefix_caching": str(info.enable_prefix_caching).lower()})
        self._totals = {name: getattr(stats, name) for name in self._totals}
        self._max_lora = info.max_loras
        self._update_lora(stats)

    def serve_http(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on a daemon thread; returns the bound port (``port`` 0 picks a free one)."""
        self._httpd, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._httpd.server_port

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # ---- updates --------------------------------------------------------------------------------------------
    def grpc_request(self, method: str, code_name: str) -> None:
        self.grpc_requests.labels(method, code_name).inc()

    def http_request(self, route: str, status: str) -> None:
        self.http_requests.labels(route, status).inc()

    def on_step(self, step: StepDone) -> None:
        """The AsyncEngine step listener (on its event thread, once per engine step)."""
        stats = step.stats
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        for name, counter in (("num_preemptions", self.preemptions), ("prefix_cache_queries", self.prefix_queries),
                              ("prefix_cache_hits", self.prefix_hits)):
            counter.inc(max(0, getattr(stats, name) - self._totals[name]))   # a counter never goes down
            self._totals[name] = getattr(stats, name)
        if step.num_step_tokens:
            self.step_tokens.observe(step.num_step_tokens)
        self._update_lora(stats)
        generated = 0
        for out in step.outputs:
            for sample in out.outputs:
                generated += len(sample.token_ids)
                self._observe_sample(out, sample, step.step_time)
        if generated:
            self.generation_tokens.inc(generated)    # once a step: a counter's lock taken once, not per token

    def _update_lora(self, stats: EngineStats) -> None:
        labels = (str(self._max_lora), ",".join(stats.running_lora_adapters), ",".join(stats.waiting_lora_adapters))
        if self._lora_labels is not None and labels != self._lora_labels:
            self.lora_info.remove(*self._lora_labels)
        self._lora_labels = labels
        self.lora_info.labels(*labels).set(time.time())

    def _observe_sample(self, out: RequestOutput, sample, now: float) -> None:
        key = (out.request_id, sample.index)
        if sample.token_ids:
            last = self._last_token_time.get(key)
            if last is not None:
                self.itl.observe(now - last)
            self._last_token_time[key] = now
            self._num_generated[key] = self._num_generated.get(key, 0) + len(sample.token_ids)
        if not sample.finished:
            return
        self._last_token_time.pop(key, None)
        self.request_success.labels(sample.finish_reason).inc()
        self.generation_len.observe(self._num_generated.pop(key, 0))
        if sample.index == 0:   # the prompt is shared by a request's n samples: count it once
            self.prompt_tokens.inc(len(out.prompt_token_ids))
            self.prompt_len.observe(len(out.prompt_token_ids))
        m = out.metrics
        if m is not None and m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
            if m.first_scheduled_time is not None:
                self.queue_time.observe(m.first_scheduled_time - m.arrival_time)
            if m.first_token_time is not None:
                self.ttft.observe(m.first_token_time - m.arrival_time)
