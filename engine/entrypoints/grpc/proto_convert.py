"""Protobuf messages of the gRPC API <-> the engine's dataclasses, on the server side.

Nothing past this module (and the servicer that calls it) sees a protobuf type. Bad input raises the engine's
own errors (RequestError, SamplingParamsError, ChatFormatError), each naming the offending field, so the one
status mapping in ``grpc_errors`` applies.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from glmserve.proto import generation_pb2 as pb

from glmserve.engine.core.adapters import AdapterKind
from glmserve.engine.core.errors import RequestError
from glmserve.engine.lora.manager import AdapterInfo
from glmserve.engine.core.outputs import CompletionOutput, RequestMetrics
from glmserve.engine.core.sampling_params import SamplingParams, StructuredOutput
from glmserve.engine.entrypoints.chat import ChatTemplate
from glmserve.engine.runtime.engine_info import EngineInfo, EngineStats
from glmserve.engine.structured.tool_call_grammar import ToolChoice
from glmserve.engine.text.chat_format import ChatFormatError, ChatMessage
from glmserve.engine.text.tokenizer import ChatGLMTokenizer

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
    params: SamplingParams              # a chat's already carry its stop ids and reply-prefix stripping
    stream: bool
    priority: int
    chat: bool                          # read its finished samples as chat replies (tool calls)
    adapter: str | None = None          # a loaded fine-tune; None: the base model


@dataclass
class SampleEnd:
    """What a sample's last response carries besides its text: from the sample's whole result."""

    result: CompletionOutput            # the whole sample: finish reason, token count, tool call
    prompt_tokens: int
    cached_tokens: int
    metrics: RequestMetrics | None


# ---- requests in ----------------------------------------------------------------------------------------------
def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    kwargs = {name: getattr(msg, name) for name in _OPTIONAL_SAMPLING_FIELDS if msg.HasField(name)}
    return SamplingParams(stop=list(msg.stop), stop_token_ids=list(msg.stop_token_ids),
                          structured=structured_from_proto(msg), **kwargs)


def structured_from_proto(msg: pb.SamplingParams) -> StructuredOutput | None:
    """The `structured` oneof (json_object = false counts as unset); the engine checks the contents."""
    which = msg.WhichOneof("structured")
    if which is None or (which == "json_object" and not msg.json_object):
        return None
    if which == "choice":
        return StructuredOutput(choice=list(msg.choice.choices))
    return StructuredOutput(**{which: getattr(msg, which)})


def tool_choice_from_proto(msg: pb.ChatRequest) -> ToolChoice:
    which = msg.tool_choice.WhichOneof("choice") if msg.HasField("tool_choice") else None
    if which == "function":
        return ToolChoice.named(msg.tool_choice.function)
    return ToolChoice(msg.tool_choice.mode) if which == "mode" else ToolChoice()


def request_id_from_proto(request_id: str) -> str:
    """The client's id, or a fresh one when it sent none."""
    if not request_id:
        return uuid.uuid4().hex
    if len(request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError("request_id", f"must be at most {MAX_REQUEST_ID_CHARS} characters")
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
                         msg.stream, msg.priority, chat=False, adapter=msg.adapter or None)


def chat_request_from_proto(msg: pb.ChatRequest, template: ChatTemplate) -> EngineRequest:
    tools = tools_from_proto(msg)
    prompt = template.prompt(messages_from_proto(msg.messages), tools)
    params = template.sampling_params(sampling_from_proto(msg.sampling), tools, tool_choice_from_proto(msg))
    return EngineRequest(request_id_from_proto(msg.request_id), prompt, params, msg.stream, msg.priority,
                         chat=True, adapter=msg.adapter or None)


def messages_from_proto(messages) -> list[ChatMessage]:
    if not messages:
        raise RequestError("messages", "a chat needs at least one message")
    result = []
    for i, m in enumerate(messages):
        try:
            result.append(ChatMessage(m.role, m.content, m.metadata))
        except ChatFormatError as exc:
            raise RequestError(f"messages[{i}]", str(exc)) from None
    return result


def tools_from_proto(msg) -> list | dict | None:
    return _parse_tools(msg.tools) if msg.HasField("tools") else None


def _parse_tools(tools_json: str):
    try:
        tools = json.loads(tools_json)
    except ValueError as exc:
        raise RequestError("tools", f"not valid JSON: {exc}") from None
    if not isinstance(tools, (list, dict)):
        raise RequestError("tools", f"must be a JSON list or object, got {type(tools).__name__}")
    return tools


def tokenize_from_proto(msg: pb.TokenizeRequest, template: ChatTemplate) -> list[int]:
    which = msg.WhichOneof("input")
    if which == "text":
        return template.tokenizer.encode(msg.text)
    if which == "chat":
        return template.prompt(messages_from_proto(msg.chat.messages), tools_from_proto(msg.chat))
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
        result = end.result
        msg.finish_reason = FINISH_REASONS[result.finish_reason]
        msg.usage.prompt_tokens = end.prompt_tokens
        msg.usage.completion_tokens = len(result.token_ids)
        msg.usage.cached_tokens = end.cached_tokens
        if end.metrics is not None:
            _fill_timings(msg.timings, end.metrics)
        if result.tool_call is not None:
            msg.tool_call.name = result.tool_call.name
            msg.tool_call.arguments_json = json.dumps(result.tool_call.arguments, ensure_ascii=False)
    return msg


def _fill_timings(timings: pb.Timings, m: RequestMetrics) -> None:
    def since_arrival(t: float | None) -> float:
        return 0.0 if t is None else t - m.arrival_time
    timings.queue_time = since_arrival(m.first_scheduled_time)
    timings.time_to_first_token = since_arrival(m.first_token_time)
    timings.total_time = since_arrival(m.finished_time)


def model_info_to_proto(info: EngineInfo) -> pb.ModelInfo:
    return pb.ModelInfo(model=info.model_name, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                        block_size=info.block_size, dtype=info.dtype, num_kv_blocks=info.num_kv_blocks)


ADAPTER_KINDS = {AdapterKind.LORA: pb.ADAPTER_KIND_LORA, AdapterKind.PTUNING: pb.ADAPTER_KIND_PTUNING}


def adapter_kind_from_proto(kind: int) -> AdapterKind | None:
    if kind == pb.ADAPTER_KIND_UNSPECIFIED:
        return None
    for ours, theirs in ADAPTER_KINDS.items():
        if theirs == kind:
            return ours
    raise RequestError("kind", f"unknown adapter kind {kind}")


def load_adapter_from_proto(msg: pb.LoadAdapterRequest) -> tuple[str, str, AdapterKind | None]:
    if not msg.name:
        raise RequestError("name", "the adapter needs a name")
    if not msg.path:
        raise RequestError("path", "the adapter's folder is missing")
    return msg.name, msg.path, adapter_kind_from_proto(msg.kind)


def adapter_info_to_proto(info: AdapterInfo) -> pb.AdapterInfo:
    return pb.AdapterInfo(name=info.name, kind=ADAPTER_KINDS[info.kind], path=info.path, rank=info.rank or 0,
                          pre_seq_len=info.pre_seq_len or 0, host_bytes=info.host_bytes, kv_bytes=info.kv_bytes)


def load_to_proto(stats: EngineStats) -> pb.Load:
    return pb.Load(num_running=stats.num_running, num_waiting=stats.num_waiting, kv_cache_usage=stats.kv_cache_usage,
                   num_free_blocks=stats.num_free_blocks, num_total_blocks=stats.num_total_blocks)
