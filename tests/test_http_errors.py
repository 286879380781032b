"""Errors of the HTTP API: OpenAI's JSON shape with the status a client expects, each surfacing as the matching
``openai`` exception class; clients that disconnect (streaming or not) abort their requests and free their KV
blocks."""
from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request

import openai
import pytest

from .server_fixtures import (MODEL, client, http_json, parse_metrics, session_server, shared_server,  # noqa: F401
                              wait_idle)

CHAT = [{"role": "user", "content": "hello"}]
LONG = dict(max_tokens=3000, temperature=0.0, extra_body={"ignore_eos": True})   # runs for seconds


@pytest.fixture
def api(shared_server) -> openai.OpenAI:
    with openai.OpenAI(base_url=shared_server.base_url, api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def error_of(exc: openai.APIStatusError) -> dict:
    body = exc.body
    assert set(body) == {"message", "type", "param", "code"}, body   # OpenAI's error object
    return body


@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": -1.0}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 5000}, "max_tokens"),                     # past max_model_len
    ({"max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"stop": [""]}, "stop"),
    ({"logprobs": True, "top_logprobs": 25}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),                    # without logprobs
    ({"seed": 1.5}, "seed"),                                  # strict types: not an integer
    ({"temperature": "hot"}, "temperature"),
    ({"tool_choice": "required"}, "tool_choice"),                           # without tools
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"logit_bias": {"5": 1.0}}, "logit_bias"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),   # without stream
    ({"extra_body": {"top_k": -5}}, "top_k"),
    ({"extra_body": {"min_p": 2.0}}, "min_p"),
    ({"extra_body": {"repetition_penalty": 0.0}}, "repetition_penalty"),
    ({"extra_body": {"min_tokens": 20}, "max_tokens": 10}, "min_tokens"),
    ({"extra_body": {"stop_token_ids": [10 ** 6]}}, "stop_token_ids"),
])
def test_bad_chat_values_are_400_naming_the_field(api, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=MODEL, messages=CHAT, **kwargs)
    error = error_of(info.value)
    assert error["param"] == param and param in error["message"]
    assert error["type"] == "invalid_request_error" and info.value.status_code == 400


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "wizard", "content": "hi"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[1, 2]"}}]}],
     "messages[1].tool_calls[0].function.arguments"),
    ([{"role": "user", "content": "x " * 5000}], "messages"),   # longer than max_model_len
])
def test_bad_messages_are_400_naming_the_field(api, messages, param):
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(model=MODEL, messages=messages, max_tokens=4)
    assert error_of(info.value)["param"] == param


@pytest.mark.parametrize("kwargs, param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [5] * 4096}, "prompt"),                     # no room left to generate
    ({"prompt": ["fine", [5] * 4096]}, "prompt"),           # a mix of shapes
    ({"prompt": [[5, 6], [5] * 4096]}, "prompt[1]"),        # the second prompt is too long
    ({"prompt": [5, 10 ** 6]}, "prompt"),                   # outside the vocabulary
    ({"prompt": [5, True]}, "prompt"),
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": "hi", "suffix": "after"}, "suffix"),
    ({"prompt": "hi", "best_of": 3}, "best_of"),
    ({"prompt": "hi", "logprobs": 25}, "logprobs"),
])
def test_bad_completion_values_are_400_naming_the_field(api, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        api.completions.create(model=MODEL, max_tokens=4, **kwargs)
    error = error_of(info.value)
    assert error["param"] == param, error
    assert param.split("[")[0] in error["message"]


def test_a_refused_second_prompt_aborts_the_first(api, client, shared_server):
    with pytest.raises(openai.BadRequestError):
        api.completions.create(model=MODEL, prompt=[[5] * 8, [5] * 4096], max_tokens=2000,
                               extra_body={"ignore_eos": True})
    wait_idle(client)   # the first prompt was submitted, then aborted: every block is free again


def test_unknown_model_is_404(api):
    with pytest.raises(openai.NotFoundError) as info:
        api.chat.completions.create(model="gpt-4o", messages=CHAT, max_tokens=2)
    error = error_of(info.value)
    assert (error["param"], error["code"]) == ("model", "model_not_found") and "gpt-4o" in error["message"]


def test_malformed_bodies_and_unknown_routes(shared_server):
    base = f"http://127.0.0.1:{shared_server.server.http_port}"
    request = urllib.request.Request(f"{base}/v1/chat/completions", b"{not json", {"content-type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 400 and "JSON" in json.loads(info.value.read())["error"]["message"]
    status, body = http_json(f"{base}/v1/completions", {"model": MODEL})
    assert status == 400 and body["error"]["param"] == "prompt"
    status, body = http_json(f"{base}/v1/nothing-here")
    assert status == 404 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = http_json(f"{base}/v1/chat/completions")   # GET
    assert status == 405


def test_unknown_fields_are_ignored(api):
    reply = api.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                        extra_body={"metadata": {"team": "x"}, "store": False})
    assert reply.choices[0].finish_reason in ("length", "stop")


# ---- clients that leave ------------------------------------------------------------------------------------------
def aborted(shared_server) -> float:
    return parse_metrics(shared_server.metrics_text()).get(
        ("glmserve_request_success_total", (("finish_reason", "abort"),)), 0.0)


def client_closed(shared_server, route: str) -> float:
    return parse_metrics(shared_server.metrics_text()).get(
        ("glmserve_http_requests_total", (("route", route), ("status", "499"))), 0.0)


def test_a_stream_whose_client_leaves_is_aborted_and_frees_its_blocks(api, client, shared_server):
    before, closed = aborted(shared_server), client_closed(shared_server, "/v1/chat/completions")
    stream = api.chat.completions.create(model=MODEL, messages=CHAT, stream=True, **LONG)
    for i, _ in enumerate(stream):
        if i == 3:
            break
    assert client.load().num_running == 1
    stream.close()
    wait_idle(client)    # GetLoad: nothing running, every KV block free
    assert aborted(shared_server) == before + 1
    assert client_closed(shared_server, "/v1/chat/completions") == closed + 1


def test_a_non_streaming_client_that_leaves_is_aborted_and_frees_its_blocks(client, shared_server):
    before, closed = aborted(shared_server), client_closed(shared_server, "/v1/completions")
    with openai.OpenAI(base_url=shared_server.base_url, api_key="unused", max_retries=0, timeout=1.0) as impatient:
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=MODEL, prompt="a long one", **LONG)
    wait_idle(client)
    assert aborted(shared_server) == before + 1
    assert client_closed(shared_server, "/v1/completions") == closed + 1


def test_a_waiting_request_whose_client_leaves_is_aborted(own_queue_server):
    """The request has not produced a token yet (it waits behind a long one): the disconnect still aborts it."""
    server = own_queue_server
    with server.client(api_key="k") as c, openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0,
                                                         timeout=60) as api:
        running = api.completions.create(model=MODEL, prompt="first", stream=True, **LONG)
        next(iter(running))
        with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0, timeout=1.0) as impatient:
            with pytest.raises(openai.APITimeoutError):
                impatient.completions.create(model=MODEL, prompt="second", max_tokens=4)
        deadline = time.monotonic() + 10
        while c.load().num_waiting and time.monotonic() < deadline:
            time.sleep(0.02)
        assert c.load().num_waiting == 0 and c.load().num_running == 1
        running.close()
        wait_idle(c)


@pytest.fixture
def own_queue_server():
    from glmserve.engine.entrypoints.server_options import ServerOptions
    from glmserve.engine.runtime.engine_core import EngineCore

    from .server_fixtures import InProcessServer, tiny_engine_config
    server = InProcessServer(options=ServerOptions(port=0, http_port=0, metrics_port=0, api_key="k",
                                                   max_waiting_requests=1),
                             make_engine=lambda: EngineCore(tiny_engine_config(max_num_seqs=1)))
    yield server
    server.close()


def test_api_key_and_full_queue(own_queue_server):
    """401 without the key or with a wrong one (health is exempt), 429 when the waiting queue is full."""
    server = own_queue_server
    base = f"http://127.0.0.1:{server.server.http_port}"
    assert http_json(f"{base}/health")[0] == 200
    for key in (None, "wrong"):
        headers = {} if key is None else {"authorization": f"Bearer {key}"}
        status, body = http_json(f"{base}/v1/models", headers=headers)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    with server.client(api_key="k") as c, openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0,
                                                         timeout=60) as api:
        running = api.completions.create(model=MODEL, prompt="one", stream=True, **LONG)
        next(iter(running))
        waiting = api.completions.create(model=MODEL, prompt="two", max_tokens=2, stream=True)   # waits
        deadline = time.monotonic() + 10
        while c.load().num_waiting != 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as info:
            api.completions.create(model=MODEL, prompt="three", max_tokens=2)
        assert error_of(info.value)["code"] == "rate_limit_exceeded" and "waiting queue" in str(info.value)
        running.close()
        assert [ch.choices[0].finish_reason for ch in waiting if ch.choices][-1] == "length"
        wait_idle(c)
    counts = server.metrics_text()
    assert 'glmserve_http_requests_total{route="/v1/completions",status="429"} 1.0' in counts
    assert 'glmserve_http_requests_total{route="/v1/chat/completions",status="401"} 1.0' in counts


def test_a_request_id_already_in_flight_is_409(api, client):
    stream = api.completions.create(model=MODEL, prompt="first", stream=True, extra_headers={"X-Request-Id": "dup"},
                                    **LONG)
    next(iter(stream))
    with pytest.raises(openai.ConflictError) as info:
        api.completions.create(model=MODEL, prompt="second", max_tokens=2, extra_headers={"X-Request-Id": "dup"})
    assert error_of(info.value)["code"] == "duplicate_request_id"
    stream.close()
    wait_idle(client)



@pytest.fixture
def small_body_server():
    from glmserve.engine.entrypoints.server_options import ServerOptions

    from .server_fixtures import InProcessServer
    server = InProcessServer(options=ServerOptions(port=0, http_port=0, metrics_port=0, max_message_bytes=1024))
    yield server
    server.close()


def _post_chunked(port: int, path: str, parts: list[bytes]) -> tuple[int, dict]:
    """A POST whose body has no Content-Length (Transfer-Encoding: chunked)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, body=iter(parts), headers={"content-type": "application/json"},
                           encode_chunked=True)
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_body_over_the_limit_is_413_and_the_server_goes_on(small_body_server):
    """--max-message-bytes bounds HTTP bodies as it bounds gRPC messages: refused on a declared Content-Length, and
    on a chunked body once the bytes read pass the limit; a body under it is served."""
    server = small_body_server
    port = server.server.http_port
    base = f"http://127.0.0.1:{port}"
    big = {"model": MODEL, "prompt": "x" * 2000, "max_tokens": 2}
    status, body = http_json(f"{base}/v1/completions", big)
    assert status == 413 and body["error"]["code"] == "request_too_large" and "1024 bytes" in body["error"]["message"]
    status, body = _post_chunked(port, "/v1/completions", [b'{"model": "glm-tiny", "prompt": "'] + [b"y" * 300] * 4
                                 + [b'", "max_tokens": 2}'])
    assert status == 413 and body["error"]["code"] == "request_too_large"
    status, body = _post_chunked(port, "/v1/completions",
                                 [b'{"model": "glm-tiny", ', b'"prompt": "hi", "max_tokens": 2}'])
    assert status == 200 and body["usage"]["completion_tokens"] == 2
    status, body = http_json(f"{base}/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 2})
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"
    assert parse_metrics(server.metrics_text())[
        ("glmserve_http_requests_total", (("route", "/v1/completions"), ("status", "413")))] == 2
    with server.client() as c:
        wait_idle(c)
