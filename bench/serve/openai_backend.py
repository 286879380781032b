"""The OpenAI backends: any server with OpenAI's HTTP API (glmserve's, vLLM's, ...), streamed over SSE.

``openai`` sends the token-id prompts of the random dataset to ``/v1/completions``; ``openai-chat`` sends the
chats of the sharegpt and multiturn datasets to ``/v1/chat/completions``. Every request streams with
``stream_options.include_usage`` (the server's prompt length) and asks for exact lengths with vLLM's extras
(``min_tokens``, ``ignore_eos``) and for each chunk's token ids (vLLM's ``return_token_ids``), so a chunk's tokens
are counted as the gRPC backend counts them. A server that sends no token ids gets one token per chunk that
carries text, and the usage's completion tokens put the total right.

The client is aiohttp, not the ``openai`` package: the harness must cost the machine as little as possible per
streamed chunk (it shares the CPU with the server under test), and aiohttp parses a line and hands it over
where the ``openai`` client builds a pydantic object per chunk and retries failed calls by itself. It is also
the client vLLM's own ``bench serve`` uses, so figures compare.

Health is ``GET /health``; the load comes from the server's Prometheus page (``--metrics-url``: glmserve's or
vLLM's gauges), sampled every 0.25 s, as scraping costs the server more than a GetLoad.
"""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from glmserve.bench.serve.backend import SERVING, BenchError, Load, ServedModel
from glmserve.bench.serve.chaos_plan import Chaos
from glmserve.bench.serve.client import (CANCELLED, DEADLINE_EXCEEDED, OK, RequestRecord, messages_for,
                                         sampling_for)
from glmserve.bench.serve.datasets import BenchPrompt
from glmserve.bench.serve.server_stats import fetch, parse_load
from glmserve.bench.serve.structured_arg import openai_fields

DATA = b"data: "
CONNECTION_ERROR = "CONNECTION_ERROR"


class OpenAIBackend:
    load_source = "/metrics"
    poll_interval_s = 0.25

    def __init__(self, base_url: str, *, chat: bool, api_key: str | None = None, model: str | None = None,
                 metrics_url: str | None = None, vocab_size: int | None = None):
        self.name = "openai-chat" if chat else "openai"
        self.base_url = base_url.rstrip("/")
        self.root = self.base_url[:-3] if self.base_url.endswith("/v1") else self.base_url   # /health, /tokenize
        self.chat = chat
        self.metrics_url = metrics_url
        self._model = model
        self._vocab_size = vocab_size
        self._structured_from: dict | None = None
        self._structured_fields: dict | None = None
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        # No limit on connections: the runner's --max-concurrency is the only cap, as with gRPC's one channel.
        self._session = aiohttp.ClientSession(headers=headers, connector=aiohttp.TCPConnector(limit=0),
                                              timeout=aiohttp.ClientTimeout(total=None, sock_connect=30))

    async def close(self) -> None:
        await self._session.close()

    # ---- facts about the server ---------------------------------------------------------------------------------
    async def model_info(self) -> ServedModel:
        url = f"{self.base_url}/models"
        try:
            async with self._session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as r:
                body = await r.json(content_type=None)
                if r.status != 200:
                    raise BenchError(f"cannot get the model list from {url}: HTTP {r.status}: {_message(body)}")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise BenchError(f"cannot get the model list from {url}: {type(exc).__name__}: {exc}") from None
        cards = {card["id"]: card for card in body.get("data", [])}
        if not cards:
            raise BenchError(f"{url} lists no model")
        if self._model is not None and self._model not in cards:
            raise BenchError(f"the server does not serve --model {self._model!r} (it serves {', '.join(cards)})")
        card = cards[self._model or next(iter(cards))]
        self._model = card["id"]
        return ServedModel(card["id"], card.get("max_model_len"), self._vocab_size or card.get("vocab_size"))

    async def count_prompt_tokens(self, messages: list[dict]) -> int:
        return (await self._tokenize({"model": self._model, "messages": messages}))["count"]

    async def count_text_tokens(self, text: str) -> int:
        return (await self._tokenize({"model": self._model, "prompt": text, "add_special_tokens": False}))["count"]

    async def _tokenize(self, payload: dict) -> dict:
        """vLLM's ``/tokenize`` (glmserve serves it too): the sharegpt dataset needs the server's token counts."""
        async with self._session.post(f"{self.root}/tokenize", json=payload) as r:
            body = await r.json(content_type=None)
            if r.status != 200:
                raise BenchError(f"the sharegpt dataset needs the server's token counts, and {self.root}/tokenize "
                                 f"answered HTTP {r.status}: {_message(body)}")
            return body

    async def health(self) -> str:
        try:
            async with self._session.get(f"{self.root}/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return SERVING if r.status == 200 else f"HTTP {r.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return f"unreachable ({type(exc).__name__})"

    async def load(self) -> Load | None:
        if self.metrics_url is None:
            return None
        return parse_load(await asyncio.to_thread(fetch, self.metrics_url, 5.0))

    def _structured(self, structured: dict | None) -> dict | None:
        """The body fields of ``structured`` (every request of a run shares one dict: converted once)."""
        if not structured:
            return None
        if self._structured_from is not structured:
            self._structured_from, self._structured_fields = structured, openai_fields(structured)
        return self._structured_fields

    # ---- one request --------------------------------------------------------------------------------------------
    def _body(self, prompt: BenchPrompt, history: list[dict], temperature: float, chaos: Chaos | None,
              structured: dict | None = None) -> dict:
        body = {"model": self._model, "stream": True, "stream_options": {"include_usage": True},
                "return_token_ids": True, **sampling_for(prompt, temperature, chaos, self._structured(structured))}
        overlong = chaos.prompt_token_ids if chaos is not None and chaos.prompt_token_ids else None
        if not self.chat:
            body["prompt"] = list(overlong or prompt.prompt_token_ids)
        elif overlong:   # one word per token of the over-long prompt: more than the context holds
            body["messages"] = [{"role": "user", "content": " ".join("x" for _ in overlong)}]
        else:
            body["messages"] = messages_for(prompt, history)
        return body

    async def send(self, request_id: str, prompt: BenchPrompt, history: list[dict], temperature: float,
                   chaos: Chaos | None = None, structured: dict | None = None) -> RequestRecord:
        """``structured``: the constraint as the gRPC client names it (``--structured``), sent in the body fields
        an OpenAI-compatible server takes (``response_format``, vLLM's ``structured_outputs``)."""
        body = self._body(prompt, history, temperature, chaos, structured)
        timeout = chaos.timeout_s if chaos is not None else None
        cancel_after = chaos.cancel_after if chaos is not None and chaos.kind == "cancel" else None
        record = RequestRecord(request_id, chaos.kind if chaos else None, time.perf_counter(),
                               prompt_len=prompt.prompt_len or 0)
        text: list[str] = []
        try:
            await asyncio.wait_for(self._call(request_id, body, record, text, cancel_after), timeout)
        except asyncio.TimeoutError:
            record.code, record.error = DEADLINE_EXCEEDED, f"no reply within {timeout:.3f}s; the client left"
        except (aiohttp.ClientError, ValueError) as exc:
            record.code, record.error = CONNECTION_ERROR, f"{type(exc).__name__}: {exc}"
        record.end = time.perf_counter()
        record.reply = "".join(text)
        return record

    async def _call(self, request_id: str, body: dict, record: RequestRecord, text: list[str],
                    cancel_after: int | None) -> None:
        path = "chat/completions" if self.chat else "completions"
        async with self._session.post(f"{self.base_url}/{path}", json=body,
                                      headers={"x-request-id": request_id}) as response:
            if response.status != 200:
                record.code, record.error = str(response.status), _message(await response.json(content_type=None))
            else:
                await self._read_stream(response, record, text, cancel_after)

    async def _read_stream(self, response: aiohttp.ClientResponse, record: RequestRecord, text: list[str],
                           cancel_after: int | None) -> None:
        finished = False
        async for line in response.content:
            if not line.startswith(DATA):
                continue
            payload = line[len(DATA):].strip()
            if payload == b"[DONE]":
                break
            now = time.perf_counter()
            event = json.loads(payload)
            if "error" in event:
                record.code, record.error = str(event["error"].get("code") or "STREAM_ERROR"), _message(event)
                return
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content") if self.chat else choice.get("text")
                tokens = choice.get("token_ids")
                count = len(tokens) if tokens is not None else (1 if piece else 0)
                if count:
                    record.chunk_times.append(now)
                    record.chunk_tokens.append(count)
                text.append(piece or "")
                finished = finished or choice.get("finish_reason") is not None
            usage = event.get("usage")
            if usage:
                record.prompt_len = usage.get("prompt_tokens", record.prompt_len)
                missing = usage.get("completion_tokens", 0) - record.output_len
                if missing > 0 and record.chunk_tokens:   # a server without token ids: put the total right
                    record.chunk_tokens[-1] += missing
            if cancel_after is not None and len(record.chunk_times) >= cancel_after and not finished:
                record.code, record.error = CANCELLED, "cancelled by the client"
                response.close()   # drop the connection: the server sees the client leave
                return
        if record.code == OK and not finished:
            record.code, record.error = CONNECTION_ERROR, "the stream ended without a finish reason"


def _message(body) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", body["error"]))
    return str(body)[:200]
