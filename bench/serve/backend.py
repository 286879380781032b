"""What the harness needs from a server, whatever protocol it speaks: the backends of ``--backend``.

  grpc          glmserve's gRPC API (Generate for token-id prompts, Chat for chats), health and GetLoad
  openai        an OpenAI-compatible HTTP server's /v1/completions (token-id prompts: the random dataset)
  openai-chat   its /v1/chat/completions (chats: the sharegpt and multiturn datasets)

A backend sends one request and records it (``send``), and reports the model, token counts for the sharegpt
dataset, health and load as far as its protocol allows. The runner, metrics and reports do not know which one
runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from glmserve.bench.serve.chaos_plan import Chaos
from glmserve.bench.serve.client import RequestRecord
from glmserve.bench.serve.datasets import BenchPrompt

BACKENDS = ("grpc", "openai", "openai-chat")
SERVING = "SERVING"


class BenchError(Exception):
    """The benchmark cannot run (server unreachable, workload does not fit the model): one line, exit 1."""


@dataclass(frozen=True)
class ServedModel:
    model: str
    max_model_len: int | None     # None: the server does not say
    vocab_size: int | None


@dataclass(frozen=True)
class Load:
    """The server's load at one instant (GetLoad, or its Prometheus gauges)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int


class Backend(Protocol):
    name: str
    load_source: str              # where peaks come from, for the report ("GetLoad", "/metrics")
    poll_interval_s: float

    async def model_info(self) -> ServedModel: ...

    async def count_prompt_tokens(self, messages: list[dict]) -> int:
        """The chat prompt's length by the server's tokenizer."""

    async def count_text_tokens(self, text: str) -> int:
        """A text's tokens by the server's tokenizer (no prompt prefix)."""

    async def send(self, request_id: str, prompt: BenchPrompt, history: list[dict], temperature: float,
                   chaos: Chaos | None = None, structured: dict | None = None) -> RequestRecord:
        """Never raises for a failed call: its status lands in the record."""

    async def health(self) -> str:
        """``SERVING`` or what was seen instead."""

    async def load(self) -> Load | None:
        """None when this backend cannot see the server's load."""

    async def close(self) -> None: ...
