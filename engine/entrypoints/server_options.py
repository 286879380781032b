"""The settings of one server process (both protocols, metrics, draining): what ``glmserve serve``'s server flags
become. The engine's own options are ``config.EngineConfig``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 50051                    # gRPC; 0: any free port (see ModelServer.port)
    http_port: int | None = None         # the OpenAI-compatible HTTP API; 0: any free port; None: off
    metrics_port: int | None = 9090      # 0: any free port; None: no /metrics endpoint
    drain_timeout: float = 30.0
    max_waiting_requests: int | None = None
    # A stream's message carries the tokens of at least this long (its first token excepted): see AsyncEngine.
    stream_interval_ms: float = 20.0
    # All streams together send at most about this many messages a second (0: no limit): past interval x rate
    # running samples, each stream's interval grows to running / rate. See AsyncEngine.
    max_stream_messages_per_s: float = 4000.0
    # CPU cores the engine core's torch threads leave to this frontend process (CPU device; core_process.py).
    frontend_cpus: int = 1
    api_key: str | None = None           # both protocols: 'authorization: Bearer KEY'
    served_model_name: str | None = None  # the HTTP API's model id (default: the engine's model name)
    tls_cert: str | None = None          # PEM files; both or neither (both protocols)
    tls_key: str | None = None
    max_message_bytes: int = 16 * 1024 * 1024
    keepalive_time_s: float = 60.0       # ping idle connections this often, to notice vanished clients
    # Recycle connections this often (GOAWAY), so clients balancing round-robin over a headless Service's pod
    # list re-resolve it and reach replicas added by the autoscaler; in-flight streams get the drain timeout.
    max_connection_age_s: float = 300.0

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.max_message_bytes < 1024:
            raise ValueError(f"--max-message-bytes must be at least 1024, got {self.max_message_bytes}")
        if self.drain_timeout < 0:
            raise ValueError(f"--drain-timeout must be >= 0, got {self.drain_timeout}")
        if not 0 <= self.stream_interval_ms <= 1000:
            raise ValueError(f"--stream-interval-ms must be in [0, 1000], got {self.stream_interval_ms}")
        if self.max_stream_messages_per_s < 0:
            raise ValueError(f"--max-stream-messages-per-s must be >= 0, got {self.max_stream_messages_per_s}")
        if self.frontend_cpus < 0:
            raise ValueError(f"--frontend-cpus must be >= 0, got {self.frontend_cpus}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 0:
            raise ValueError(f"--max-waiting-requests must be >= 0, got {self.max_waiting_requests}")
        if self.served_model_name is not None and not self.served_model_name.strip():
            raise ValueError("--served-model-name must not be empty")
