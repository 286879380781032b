"""Protobuf messages of the gRPC API <-> the engine's dataclasses, on the server side.

Nothing past this module (and the servicer that calls it) sees a protobuf type. Bad input raises the engine's
own errors (RequestError, SamplingParamsError, ChatFormatError), each naming the offending field, so the one
status mapping in ``grpc_errors`` applies.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass

from glmserve.proto import generation_pb2 as pb

from glmserve.engine.text.chat_format import ChatFormatError, ChatMessage, build_chat_prompt
from glmserve.engine.core.errors import RequestError
from glmserve.engine.core.outputs import CompletionOutput, RequestMetrics
from glmserve.engine.core.sampling_params import SamplingParams
from glmserve.engine.text.tokenizer import ChatGLMTokenizer
from glmserve.engine.text.tool_call import ToolCall

# Sampling fields that are proto3 `optional`: copied only when the client set them, so absent ones keep the
# SamplingParams defaults.
_OPTIONAL_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                             "frequency_penalty", "seed", "max_tokens", "min_tokens", "ignore_eos", "logprobs", "n")
MAX_REQUEST_ID_CHARS = 256

FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "tool_call": pb.FINISH_REASON_TOOL_CALL,
}


@dataclass
class EngineRequest:
    """A Generate or Chat call, ready for ``AsyncEngine.generate``."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    stream: bool
    priority: int
    chat: bool


@dataclass
class SampleEnd:
    """What a sample's last response carries besides its text."""

    finish_reason: str                  # the engine's reason, or "tool_call" for a parsed tool call
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    metrics: RequestMetrics | None
    tool_call: ToolCall | None = None


# ---- requests in ----------------------------------------------------------------------------------------------
def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    kwargs = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING_FIELDS if msg.HasField(name)}
    return SamplingParams(stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids), **kwargs)


def request_id_from_proto(request_id: str) -> str:
    """The client's id, or a fresh one when it sent none."""
    if not request_id:
        return uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
    if "#" in request_id:  # the engine names the samples of an n > 1 request "<id>#<index>"
        raise RequestError("request_id", "must not contain '#'")
    return request_id


def generate_request_from_proto(msg: pb.GenerateRequest, tokenizer: ChatGLMTokenizer) -> EngineRequest:
    which = msg.WhichOneof("input")
    if which is None:
        raise RequestError("input", "set either prompt or prompt_token_ids")
    if which == "prompt":
        if not msg.prompt:
            raise RequestError("prompt", "the prompt is empty")
        prompt = tokenizer.encode(msg.prompt)
    else:
        prompt = list(msg.prompt_token_ids.ids)   # the engine checks them against the vocabulary
    return EngineRequest(request_id_from_proto(msg.request_id), prompt, sampling_from_proto(msg.sampling),
                         msg.stream, msg.priority, chat=False)


def chat_request_from_proto(msg: pb.ChatRequest, tokenizer: ChatGLMTokenizer) -> EngineRequest:
    tools = msg.tools if msg.HasField("tools") else None
    prompt = build_chat_prompt(tokenizer, messages_from_proto(msg.messages, tools))
    return EngineRequest(request_id_from_proto(msg.request_id), prompt, sampling_from_proto(msg.sampling),
                         msg.stream, msg.priority, chat=True)


def messages_from_proto(messages, tools_json: str | None) -> list[ChatMessage]:
    """ChatGLM3 messages; the tools go on the first system message (an empty one is put first if none)."""
    if not messages:
        raise RequestError("messages", "a chat needs at least one message")
    result = []
    for i, m in enumerate(messages):
        try:
            result.append(ChatMessage(m.role, m.content, m.metadata))
        except ChatFormatError as exc:
            raise RequestError(f"messages[{i}]", str(exc)) from None
    if tools_json is None:
        return result
    tools = _parse_tools(tools_json)
    first_system = next((i for i, m in enumerate(result) if m.role == "system"), None)
    if first_system is None:
        return [ChatMessage("system", "", tools=tools)] + result
    result[first_system] = dataclasses.replace(result[first_system], tools=tools)
    return result


def _parse_tools(tools_json: str):
    try:
        tools = json.loads(tools_json)
    except ValueError as exc:
        raise RequestError("tools", f"not valid JSON: {exc}") from None
    if not isinstance(tools, (list, dict)):
        raise RequestError("tools", f"must be a JSON list or object, got {type(tools).__name__}")
    return tools


def tokenize_from_proto(msg: pb.TokenizeRequest, tokenizer: ChatGLMTokenizer) -> list[int]:
    which = msg.WhichOneof("input")
    if which == "text":
        return tokenizer.encode(msg.text)
    if which == "chat":
        tools = msg.chat.tools if msg.chat.HasField("tools") else None
        return build_chat_prompt(tokenizer, messages_from_proto(msg.chat.messages, tools))
    raise RequestError("input", "set either text or chat")


# ---- responses out --------------------------------------------------------------------------------------------
def response_to_proto(request_id: str, sample: CompletionOutput, end: SampleEnd | None = None) -> pb.GenerateResponse:
    msg = pb.GenerateResponse(request_id=request_id, index=sample.index, text=sample.text, token_ids=sample.token_ids)
    if sample.logprobs is not None:
        for token_id, logprob, top in zip(sample.token_ids, sample.logprobs, sample.top_logprobs or []):
            entry = msg.logprobs.add(token_id=token_id, logprob=logprob)
            for top_id, top_logprob in top or ():
                entry.top.add(token_id=top_id, logprob=top_logprob)
    if end is not None:
        msg.finish_reason = FINISH_REASONS[end.finish_reason]
        msg.usage.prompt_tokens = end.prompt_tokens
        msg.usage.completion_tokens = end.completion_tokens
        msg.usage.cached_tokens = end.cached_tokens
        if end.metrics is not None:
            _fill_timings(msg.timings, end.metrics)
        if end.tool_call is not None:
            msg.tool_call.name = end.tool_call.name
            msg.tool_call.arguments_json = json.dumps(end.tool_call.arguments, ensure_ascii=False)
    return msg


def _fill_timings(timings: pb.Timings, m: RequestMetrics) -> None:
    def since_arrival(t: float | None) -> float:
        return 0.0 if t is None else t - m.arrival_time
    timings.queue_time = since_arrival(m.first_scheduled_time)
    timings.time_to_first_token = since_arrival(m.first_token_time)
    timings.total_time = since_arrival(m.finished_time)


def model_info_to_proto(engine) -> pb.ModelInfo:
    return pb.ModelInfo(model=engine.model_name, max_model_len=engine.max_model_len,
                        vocab_size=engine.tokenizer.vocab_size, block_size=engine.config.cache.block_size,
                        dtype=str(engine.dtype).removeprefix("torch."), num_kv_blocks=engine.num_blocks)


def load_to_proto(stats: dict) -> pb.Load:
    return pb.Load(num_running=stats["num_running"], num_waiting=stats["num_waiting"],
                   kv_cache_usage=stats["kv_cache_usage"], num_free_blocks=stats["num_free_blocks"],
                   num_total_blocks=stats["num_total_blocks"])
